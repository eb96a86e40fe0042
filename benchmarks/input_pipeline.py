"""What a training user pays for data loading: ours (Grain over ArrayRecord) vs
the PyTorch reference's approach (a torch Dataset reading JPEG/PNG files).

  python -m benchmarks.input_pipeline [--quick] [--json OUT.json] [--size 256x176] ...

Setup (cached in --work-dir, reused by later runs with the same settings):
  1. N pairs of synthetic people (``data_prep.synthetic_people``) are written as
     an FPDM-layout folder: img/<...>.jpg "originals" (default 440x300, JPEG q95),
     pose/<...>.txt keypoints (256x256 frame) and train/test_pairs_data.json;
     plus pose_img/<...>.png, the pose images rendered at the original size, as
     the reference reads pre-rendered pose images.
  2. Our ArrayRecord dataset is built from that folder with
     ``python -m data_prep.build deepfashion --layout fpdm --image-size HxW`` (HxW =
     --size):
     photos stored at --size (JPEG), pose images PNG.

Both loaders then produce the same stage-2 view set, per pair:
  target       target photo at --size, [-1, 1]
  target_pose  target pose image at --size, [0, 1]
  source_clip  source photo at --clip-size square, CLIP mean/std
  source_enc   source photo at --source-size (default --size), ImageNet mean/std
(ours also carries the keypoints and pair index, 37 numbers, which MakeViews
always keeps; ours is HWC, torch is CHW as ToTensor makes).

  ours         fpdm_jax.input_pipeline.make_loader: DecodeRecord (cv2) -> MakeViews
               (cv2 resize, uint8) -> Batch, grain worker_count=W. The float
               normalisation runs inside the jitted train step on the device
               (input_pipeline.normalise), so it is not part of loading.
  torch        torch Dataset: PIL open of source JPEG, target JPEG and target pose
               PNG from the folder, PIL bicubic resize, then ToTensor + Normalize done
               step for step in numpy (CHW uint8 -> float32 / 255 -> per-channel
               (x - mean) / std), torch.from_numpy; torch DataLoader(batch_size,
               num_workers=W, shuffle=True, drop_last=True, persistent_workers).
  torch_stored (opt-in with --impls) the same torch Dataset over a copy of the folder
               already resized to --size, i.e. the file format at our stored size:
               separates "smaller stored images" from "per-record pipeline cost".

Every (implementation, workers) runs in its own fresh Python process (no state,
threads or imports shared between loaders). In it: start-up = creating the loader
and getting the first batch (includes spawning workers); then --warmup batches;
then --repeats timed passes of --batches batches each; records/s = batches x
batch size / pass time, reported as the median over passes. Loaders consume
batches as fast as possible (no model step), so this is the loader's ceiling.
All files are in the page cache after setup, so this measures CPU, not disk.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

IMPLS = ("ours", "torch", "torch_stored")
POSES_PER_ID = 4  # images per identity; pairs are the ordered pairs within one identity


# ----------------------------------------------------------------------------
# Arguments.

def parse_hw(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 256x176, got {text!r}")
  if h <= 0 or w <= 0:
    raise argparse.ArgumentTypeError(f"{text}: sizes must be positive")
  return h, w


def parse_ints(text: str) -> list[int]:
  try:
    out = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
  if not out or min(out) < 0:
    raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
  return out


def parse_impls(text: str) -> list[str]:
  out = [v.strip() for v in text.split(",") if v.strip()]
  bad = [v for v in out if v not in IMPLS]
  if bad or not out:
    raise argparse.ArgumentTypeError(f"unknown implementation(s) {bad}; choose from {IMPLS}")
  return out


def default_work_dir() -> Path:
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(cache) / "fpdm_jax" / "bench_input_pipeline"


def make_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.input_pipeline", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 24 pairs, batch 4, 3 batches x 1 pass, 1 warm-up batch "
                      "(explicit flags given with it still win)")
  p.add_argument("--json", metavar="OUT.json", help="also write all results and the machine here")
  p.add_argument("--pairs", type=int, help="training pairs to generate (default 1024; quick 24)")
  p.add_argument("--size", type=parse_hw, default=(256, 176),
                 help="HxW stored in our dataset and produced by both loaders for target, "
                      "target_pose (default 256x176)")
  p.add_argument("--original-size", type=parse_hw, default=(440, 300),
                 help="HxW of the generated 'original' JPEGs the torch baseline reads "
                      "(DeepFashion's aspect; real originals are 1101x750; default 440x300)")
  p.add_argument("--clip-size", type=int, default=224, help="source_clip side (default 224)")
  p.add_argument("--source-size", type=parse_hw,
                 help="HxW of source_enc, the source-encoder view (default: --size)")
  p.add_argument("--batch-size", type=int, help="records per batch, both loaders (default 16; quick 4)")
  p.add_argument("--batches", type=int, help="batches per timed pass (default 8; quick 3)")
  p.add_argument("--repeats", type=int, help="timed passes; the median is reported (default 5; quick 1)")
  p.add_argument("--warmup", type=int, help="batches after the first, untimed (default 2; quick 1)")
  p.add_argument("--workers", type=parse_ints, default=[0, 1, 2],
                 help="comma-separated worker counts: grain worker_count and torch "
                      "num_workers; 0 loads in the main process (default 0,1,2)")
  p.add_argument("--impls", type=parse_impls, default=["ours", "torch"],
                 help=f"comma-separated subset of {','.join(IMPLS)} (default ours,torch)")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="torch.set_num_threads in the torch main process (its DataLoader "
                      "workers always use 1); 0 keeps torch's default, which on a busy "
                      "2-core machine made default_collate's torch.stack ~4x slower at "
                      "num_workers=0 (default 1)")
  p.add_argument("--work-dir", type=Path, default=default_work_dir(),
                 help="where the generated folder and built dataset are cached "
                      "(default: %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="generation and shuffling seed (default 0)")
  p.add_argument("--setup-workers", type=int, default=min(2, os.cpu_count() or 1),
                 help="processes generating images and building the dataset (default %(default)s)")
  p.add_argument("--run-one", help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
  return p


def finish_args(args) -> argparse.Namespace:
  quick = dict(pairs=24, batch_size=4, batches=3, repeats=1, warmup=1)
  full = dict(pairs=1024, batch_size=16, batches=8, repeats=5, warmup=2)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.source_size is None:
    args.source_size = args.size
  for k in ("pairs", "batch_size", "batches", "repeats", "clip_size"):
    if getattr(args, k) <= 0:
      raise SystemExit(f"error: --{k.replace('_', '-')} must be positive")
  if args.warmup < 0:
    raise SystemExit("error: --warmup must be >= 0")
  h, w = args.size
  if h % 8 or w % 8:
    raise SystemExit("error: --size must be multiples of 8 (data_prep.build requires it)")
  needed = (1 + args.warmup + args.repeats * args.batches) * args.batch_size
  if needed > args.pairs:
    print(f"note: {needed} records per run > {args.pairs} pairs: the torch loader will "
          "start a new epoch (persistent workers) inside the timed passes", file=sys.stderr)
  return args


def views_for(size, source_size, clip_size) -> dict:
  """The stage-2 view set, in ``input_pipeline.parse_views`` config form."""
  return {
      "target": ("target_image", tuple(size), "symmetric"),
      "target_pose": ("target_pose_image", tuple(size), "unit"),
      "source_clip": ("source_image", (clip_size, clip_size), "clip"),
      "source_enc": ("source_image", tuple(source_size), "imagenet"),
  }


# ----------------------------------------------------------------------------
# Setup: the FPDM-layout folder and our dataset.

def _image_rel(identity: int, pose: int) -> str:
  gender = "MEN" if identity % 2 else "WOMEN"
  return f"img/{gender}/Tees_Tanks/id_{identity:08d}/0{pose + 1}_1_front.jpg"


def pose_img_rel(image_rel: str) -> str:
  """``img/.../x.jpg`` -> ``pose_img/.../x.png`` (the torch baseline's pose image)."""
  return "pose_img/" + image_rel.split("/", 1)[1].rsplit(".", 1)[0] + ".png"


def _write_identity(job) -> None:
  """Draws POSES_PER_ID photos of one identity with keypoint txt and pose PNG."""
  import numpy as np
  from PIL import Image

  from data_prep import synthetic_people
  from fpdm_jax import skeleton
  root, identity, (h, w), seed = job
  root = Path(root)
  ident = synthetic_people.sample_identity(np.random.default_rng([seed, identity]))
  for pose in range(POSES_PER_ID):
    k = synthetic_people.sample_pose(np.random.default_rng([seed, identity, pose]), h, w)
    photo = synthetic_people.draw_person(ident, k, h, w)
    rel = _image_rel(identity, pose)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo).save(root / rel, quality=95)
    # FPDM pose txt: 18 "x y" lines in the 256x256 frame (176 wide crop at x=40).
    vis = np.all(k >= 0, -1)
    k256 = np.where(vis[:, None], np.stack([k[:, 0] * 176.0 / w + 40.0, k[:, 1] * 256.0 / h], -1),
                    -1.0)
    txt = root / ("pose/" + rel.split("/", 1)[1].rsplit(".", 1)[0] + ".txt")
    txt.parent.mkdir(parents=True, exist_ok=True)
    txt.write_text("".join(f"{x:.4f} {y:.4f}\n" for x, y in k256))
    # The pose image as the reference ships it: drawn at the original size.
    k_px = skeleton.deepfashion_to_pixels(np.loadtxt(txt, dtype=np.float32), h, w)
    pose_png = root / pose_img_rel(rel)
    pose_png.parent.mkdir(parents=True, exist_ok=True)
    pose_im = skeleton.render_skeleton(k_px, h, w)
    Image.fromarray(pose_im).save(pose_png, compress_level=1)


def pair_list(num_pairs: int) -> list[tuple[str, str]]:
  """Ordered pairs (a != b) of images of one identity, identity after identity."""
  out = []
  identity = 0
  while len(out) < num_pairs:
    for a in range(POSES_PER_ID):
      for b in range(POSES_PER_ID):
        if a != b and len(out) < num_pairs:
          out.append((_image_rel(identity, a), _image_rel(identity, b)))
    identity += 1
  return out


def prepare_folder(args) -> Path:
  """The FPDM-layout folder (cached); returns its root."""
  h0, w0 = args.original_size
  root = args.work_dir / f"fpdm_{args.pairs}pairs_{h0}x{w0}_seed{args.seed}"
  train = pair_list(args.pairs)
  test_id = len({p[0].split("/")[3] for p in train})  # one more identity for a tiny test split
  test = [(_image_rel(test_id, a), _image_rel(test_id, (a + 1) % POSES_PER_ID))
          for a in range(POSES_PER_ID)]
  num_ids = test_id + 1
  marker = root / "COMPLETE"
  if marker.is_file():
    return root
  t0 = time.perf_counter()
  print(f"[setup] drawing {num_ids * POSES_PER_ID} images ({h0}x{w0}) of {num_ids} people "
        f"into {root}", file=sys.stderr, flush=True)
  root.mkdir(parents=True, exist_ok=True)
  jobs = [(str(root), i, (h0, w0), args.seed) for i in range(num_ids)]
  if args.setup_workers > 1:
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(args.setup_workers) as pool:
      for _ in pool.imap_unordered(_write_identity, jobs):
        pass
  else:
    for job in jobs:
      _write_identity(job)
  for split, lst in (("train", train), ("test", test)):
    (root / f"{split}_pairs_data.json").write_text(json.dumps(
        [{"source_image": f"./{s}", "target_image": f"./{t}"} for s, t in lst]))
  marker.write_text("ok\n")
  print(f"[setup] folder ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  return root


def prepare_stored(root: Path, size) -> None:
  """torch_stored's files: img/ and pose_img/ resized (PIL bicubic) to ``size``, cached."""
  from PIL import Image
  h, w = size
  out_root = root / f"stored_{h}x{w}"
  if (out_root / "COMPLETE").is_file():
    return
  print(f"[setup] resizing img/ and pose_img/ to {h}x{w} into {out_root}", file=sys.stderr,
        flush=True)
  for sub in ("img", "pose_img"):
    for path in sorted((root / sub).rglob("*.*")):
      out = out_root / path.relative_to(root)
      out.parent.mkdir(parents=True, exist_ok=True)
      with Image.open(path) as im:
        small = im.convert("RGB").resize((w, h), Image.BICUBIC)
      small.save(out, **({"quality": 95} if out.suffix == ".jpg" else {"compress_level": 1}))
  (out_root / "COMPLETE").write_text("ok\n")


def dataset_name(size) -> str:
  return f"deepfashion/fpdm_{size[0]}x{size[1]}"


def build_dataset(args, root: Path) -> Path:
  """Our ArrayRecord dataset from the folder (cached); returns the TFDS data dir."""
  from fpdm_jax import input_pipeline as ip
  data_dir = root / "tfds"
  try:
    ip.dataset_dir(data_dir, dataset_name(args.size))
    return data_dir
  except FileNotFoundError:
    pass
  from data_prep import build
  h, w = args.size
  argv = ["deepfashion", "--src", str(root), "--layout", "fpdm", "--image-size", f"{h}x{w}",
          "--data-dir", str(data_dir), "--workers", str(args.setup_workers), "--strict"]
  print(f"[setup] python -m data_prep.build {' '.join(argv)}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  code = build.main(argv)
  if code:
    raise SystemExit(f"data_prep.build failed with exit code {code}")
  print(f"[setup] dataset built in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  return data_dir


# ----------------------------------------------------------------------------
# The torch baseline (the reference's approach; torchvision is not installed, so
# PIL resize + numpy normalisation stand in for transforms.Resize/ToTensor/Normalize).

NORMS = {  # name: (mean, std) on [0, 1] pixels, as fpdm_jax.input_pipeline.NORMALISATIONS
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_FILE_OF = {"source_image": "source", "target_image": "target",
            "source_pose_image": "source_pose", "target_pose_image": "target_pose"}


class FolderPairs:
  """torch-style map Dataset over an FPDM-layout folder (PIL + numpy per item)."""

  def __init__(self, root: str, views: dict, image_root: str | None = None):
    self.root = Path(root)
    self.image_root = Path(image_root or root)
    entries = json.loads((self.root / "train_pairs_data.json").read_text())
    self.pairs = [(e["source_image"].removeprefix("./"), e["target_image"].removeprefix("./"))
                  for e in entries]
    self.views = views
    needed = {key for key, _, _ in views.values()}
    self.needed = [k for k in _FILE_OF if k in needed]

  def __len__(self):
    return len(self.pairs)

  def _path(self, index: int, key: str) -> Path:
    src, tgt = self.pairs[index]
    rel = src if key.startswith("source") else tgt
    return self.image_root / (pose_img_rel(rel) if "pose" in key else rel)

  def __getitem__(self, index: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    images = {}
    for key in self.needed:
      with Image.open(self._path(index, key)) as im:
        images[key] = im.convert("RGB")
    out = {}
    for name, (key, (h, w), norm) in self.views.items():
      im = images[key]
      if im.size != (w, h):
        im = im.resize((w, h), Image.BICUBIC)
      # transforms.ToTensor then Normalize, step for step in numpy: HWC uint8 -> CHW,
      # float32 / 255, then per-channel (x - mean) / std over whole planes.
      mean, std = (np.asarray(v, np.float32)[:, None, None] for v in NORMS[norm])
      x = np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)).astype(np.float32) / 255.0
      out[name] = torch.from_numpy((x - mean) / std)
    out["pair_index"] = index
    return out


def make_torch_dataset(cfg: dict, stored: bool):
  views = {k: (v[0], tuple(v[1]), v[2]) for k, v in cfg["views"].items()}
  image_root = None
  if stored:
    h, w = cfg["size"]
    image_root = str(Path(cfg["folder"]) / f"stored_{h}x{w}")
  return FolderPairs(cfg["folder"], views, image_root)


# ----------------------------------------------------------------------------
# One measurement (runs in a fresh process).

def _forever(loader):
  while True:
    yield from loader


def run_one(cfg: dict) -> dict:
  t_import = time.perf_counter()
  impl, workers, bs = cfg["impl"], cfg["workers"], cfg["batch_size"]
  if impl == "ours":
    from absl import flags

    from fpdm_jax import input_pipeline as ip
    # Grain's multiprocess loader reads absl flags, which a plain (non-absl.app) script has
    # not parsed: without this, worker_count > 0 raises UnparsedFlagAccessError.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    t_import = time.perf_counter() - t_import
    t0 = time.perf_counter()
    lcfg = ip.LoaderConfig(data_dir=cfg["data_dir"], name=cfg["name"], split="train",
                           views=cfg["views"], batch_size=bs, shuffle=True, seed=cfg["seed"],
                           num_epochs=None, worker_count=workers)
    it = iter(ip.make_loader(lcfg, process_index=0, process_count=1))
  else:
    import torch
    from torch.utils.data import DataLoader
    if cfg["torch_threads"] > 0:
      torch.set_num_threads(cfg["torch_threads"])
    t_import = time.perf_counter() - t_import
    t0 = time.perf_counter()
    ds = make_torch_dataset(cfg, stored=impl == "torch_stored")
    loader = DataLoader(ds, batch_size=bs, num_workers=workers, shuffle=True, drop_last=True,
                        persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg["seed"]))
    it = _forever(loader)
  first = next(it)
  startup = time.perf_counter() - t0
  shapes = {k: list(v.shape) for k, v in first.items() if len(v.shape) == 4}
  for _ in range(cfg["warmup"]):
    next(it)
  passes = []
  for _ in range(cfg["repeats"]):
    t = time.perf_counter()
    for _ in range(cfg["batches"]):
      next(it)
    passes.append(time.perf_counter() - t)
  rates = [cfg["batches"] * bs / p for p in passes]
  import cv2
  return {"impl": impl, "workers": workers, "startup_s": startup, "import_s": t_import,
          "cv2_threads": cv2.getNumThreads(), "loadavg_at_end": os.getloadavg(),
          "pass_s": passes, "records_per_s": rates,
          "records_per_s_median": statistics.median(rates), "batch_shapes": shapes}


def measure(cfg: dict) -> dict:
  """``run_one`` in a fresh interpreter; returns its JSON result."""
  cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--run-one", json.dumps(cfg)]
  proc = subprocess.run(cmd, capture_output=True, text=True,
                        cwd=str(Path(__file__).resolve().parent.parent))
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"measurement {cfg['impl']} workers={cfg['workers']} failed "
                     f"(exit {proc.returncode})")
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------
# Checks and reporting.

def check_views_agree(cfg: dict) -> dict:
  """Mean |ours - torch| per view for one pair (same views, different resize paths)."""
  import numpy as np

  from fpdm_jax import input_pipeline as ip
  source = ip.open_source(cfg["data_dir"], cfg["name"], "train")
  record = ip.DecodeRecord().map(source[0])
  # Ours ships uint8 views and normalises inside the jitted train step.
  ours = {k: np.asarray(v) for k, v in ip.normalise(
      ip.MakeViews(ip.parse_views(cfg["views"])).map(record), cfg["views"]).items()}
  theirs = make_torch_dataset(cfg, stored=False)[int(record["pair_index"])]
  out = {}
  for name in cfg["views"]:
    a, b = ours[name], theirs[name].numpy().transpose(1, 2, 0)
    if a.shape != b.shape:
      raise SystemExit(f"view {name}: ours {a.shape} vs torch {b.shape} (HWC)")
    out[name] = float(np.abs(a - b).mean())
  return out


def machine_info() -> dict:
  from benchmarks.common import machine_info as info
  return info(("jax", "grain", "torch", "numpy", "opencv-python", "opencv-python-headless",
               "pillow", "tensorflow-datasets", "array-record"))


def machine_line(m: dict) -> str:
  v = m["versions"]
  return (f"Machine: {m['sched_cpus']} CPUs (nproc) · {m['cpu']} · Python {m['python']} · "
          f"jax {v.get('jax', '?')} · grain {v.get('grain', '?')} · torch {v.get('torch', '?')}")


def table(results: list[dict]) -> str:
  """Markdown: one row per (implementation, workers); ours / baseline at the same workers."""
  baselines = [i for i in IMPLS if i != "ours" and any(r["impl"] == i for r in results)]
  rate = {(r["impl"], r["workers"]): r["records_per_s_median"] for r in results}
  rows = ["| implementation | workers | records/s (median) | passes min–max | start-up s | "
          + " | ".join(f"ours / {b}" for b in baselines) + " |",
          "|---|---:|---:|---:|---:|" + "---:|" * len(baselines)]
  for r in results:
    ratios = []
    for b in baselines:
      other = rate.get((b, r["workers"]))
      ratios.append(f"{r['records_per_s_median'] / other:.2f}×"
                    if r["impl"] == "ours" and other else "")
    rows.append(f"| {r['impl']} | {r['workers']} | {r['records_per_s_median']:.1f} | "
                f"{min(r['records_per_s']):.1f}–{max(r['records_per_s']):.1f} | "
                f"{r['startup_s']:.2f} | " + " | ".join(ratios) + " |")
  return "\n".join(rows)


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  if args.run_one:
    print(json.dumps(run_one(json.loads(args.run_one))), flush=True)
    return 0
  args = finish_args(args)
  t_start = time.perf_counter()
  machine = machine_info()
  folder = prepare_folder(args)
  data_dir = build_dataset(args, folder)
  if "torch_stored" in args.impls:
    prepare_stored(folder, args.size)
  base = {"data_dir": str(data_dir), "name": dataset_name(args.size), "folder": str(folder),
          "size": list(args.size), "seed": args.seed, "torch_threads": args.torch_threads,
          "batch_size": args.batch_size,
          "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
          "views": {k: [v[0], list(v[1]), v[2]] for k, v in
                    views_for(args.size, args.source_size, args.clip_size).items()}}
  agreement = check_views_agree(base)
  results = []
  for workers in args.workers:
    for impl in args.impls:
      print(f"[run] {impl} workers={workers}", file=sys.stderr, flush=True)
      r = measure(dict(base, impl=impl, workers=workers))
      print(f"[run]   {r['records_per_s_median']:.1f} records/s, start-up {r['startup_s']:.2f}s",
            file=sys.stderr, flush=True)
      results.append(r)
  ours_shapes = {k: sorted(v) for r in results if r["impl"] == "ours"
                 for k, v in r["batch_shapes"].items()}
  torch_shapes = {k: sorted(v) for r in results if r["impl"] != "ours"
                  for k, v in r["batch_shapes"].items()}
  if ours_shapes and torch_shapes and ours_shapes != torch_shapes:
    raise SystemExit(f"view shapes differ: ours {ours_shapes} vs torch {torch_shapes}")
  h0, w0 = args.original_size
  print()
  print(machine_line(machine))
  print(f"Setup: {args.pairs} pairs; originals {h0}x{w0} JPEG q95 + pose PNG (torch reads these); "
        f"ours stored at {args.size[0]}x{args.size[1]}; batch {args.batch_size}; "
        f"{args.repeats} passes x {args.batches} batches after {args.warmup} warm-up; "
        f"torch threads {args.torch_threads or 'default'}; "
        f"views: " + ", ".join(f"{k} {v[1][0]}x{v[1][1]} {v[2]}" for k, v in base["views"].items()))
  print()
  print(table(results))
  print()
  print("mean |ours - torch| per view on one pair: " +
        ", ".join(f"{k} {v:.4f}" for k, v in agreement.items()))
  if args.json:
    out = {"command": "python -m benchmarks.input_pipeline " + " ".join(
               sys.argv[1:] if argv is None else argv),
           "machine": machine, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                            for k, v in vars(args).items() if k != "run_one"},
           "views": base["views"], "view_agreement_mean_abs": agreement, "results": results,
           "total_s": time.perf_counter() - t_start}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
