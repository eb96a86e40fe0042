"""Builds a pair dataset into TFDS ArrayRecord shards.

  python -m data_prep.build synthetic --data-dir OUT [--num-train N --num-test M
      --image-size 64x64 --seed S]
  python -m data_prep.build deepfashion --src ROOT --data-dir OUT
      [--layout fpdm|cfld] [--image-size 512x352]

The dataset lands in OUT/<name>/<config>/1.0.0 with a prep_report.json that
counts skipped pairs per split and reason. Bad pairs are skipped (or, with
--strict, stop the build with the file named). An interrupted build keeps
its finished chunks: rerun the same command to continue.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_size(text: str) -> tuple[int, int]:
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 512x352, got {text!r}")
  if h <= 0 or w <= 0 or h % 8 or w % 8:
    raise argparse.ArgumentTypeError(f"{text}: height and width must be positive multiples of 8")
  return h, w


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.build", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="dataset", required=True)

  def common(p):
    p.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes decoding and drawing in parallel (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad pair instead of skipping it")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="pairs per resumable staging chunk (default: %(default)s)")
    p.add_argument("--keep-staging", action="store_true",
                   help="keep the staged chunks after a successful build")

  s = sub.add_parser("synthetic", help="the embedded procedurally generated dataset")
  common(s)
  s.add_argument("--num-train", type=int, default=2000)
  s.add_argument("--num-test", type=int, default=200)
  s.add_argument("--image-size", type=parse_size, default=(64, 64), help="HxW (default 64x64)")
  s.add_argument("--seed", type=int, default=0)

  d = sub.add_parser("deepfashion", help="DeepFashion In-shop pairs from a local folder")
  common(d)
  d.add_argument("--src", required=True, help="dataset root (see DATA_FORMATS in README)")
  d.add_argument("--layout", choices=("fpdm", "cfld"), default="fpdm")
  d.add_argument("--image-size", type=parse_size, default=(512, 352),
                 help="stored HxW (default 512x352)")
  d.add_argument("--min-keypoints", type=int, default=4,
                 help="skip poses with fewer visible keypoints (default: %(default)s)")
  return parser


def make_builder(args):
  kw = dict(data_dir=args.data_dir, workers=args.workers, strict=args.strict,
            chunk_size=args.chunk_size, keep_staging=args.keep_staging)
  h, w = args.image_size
  if args.dataset == "synthetic":
    from data_prep import synthetic
    cfg = synthetic.make_config(h, w, args.num_train, args.num_test, args.seed)
    return synthetic.SyntheticPeople(config=cfg, **kw)
  from data_prep import deepfashion
  if not os.path.isdir(args.src):
    raise SystemExit(f"error: --src {args.src} is not a directory")
  cfg = deepfashion.make_config(args.src, args.layout, h, w, args.min_keypoints)
  return deepfashion.Deepfashion(config=cfg, **kw)


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  from data_prep import pairs
  builder = make_builder(args)
  try:
    report = builder.build()
  except pairs.BadInput as e:
    print(f"error (--strict): {e}\nFix or remove the file and rerun; finished chunks are kept.",
          file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Built {builder.name}/{builder.builder_config.name} in {builder.data_dir}")
  print(pairs.SkipReport.summary_of(report))
  print(f"Report: {os.path.join(builder.data_dir, 'prep_report.json')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
