"""Trains FPDM stage 1 or stage 2.

  python -m fpdm_jax.train --config configs/synthetic.py:stage1 --workdir runs/s1 \\
      [--config.train.num_steps=1000 ...]

The config's ``stage`` field picks the trainer. Rerunning the same command
resumes from the newest checkpoint in WORKDIR/checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class _QuietLibraries(logging.Filter):
  """Orbax logs every save step at INFO through absl; keep its warnings only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  from fpdm_jax import config_lib
  overrides, rest = config_lib.split_argv(argv)
  parser = argparse.ArgumentParser(
      prog="python -m fpdm_jax.train", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Any config field can be overridden as --config.FIELD=VALUE.")
  parser.add_argument("--config", required=True, help="configs/FILE.py[:VARIANT]")
  parser.add_argument("--workdir", required=True, help="checkpoints, logs and exports go here")
  args = parser.parse_args(rest)
  setup_logging()
  try:
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from fpdm_jax import distributed
  distributed.initialize_from_env()
  from fpdm_jax.trainers import common, loop
  try:
    summary = loop.train_and_evaluate(config, args.workdir)
  except common.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  logging.info("Done: %s", summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
