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


def use_compilation_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at ``path`` (unless the user's
  $JAX_COMPILATION_CACHE_DIR already does): a run resumed after preemption
  then starts in the time it takes to load its executables, not to compile
  them (minutes for the full-size steps). Set before anything compiles."""
  if not path or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  # The small helper functions recompile faster than the cache reads them.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


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
  multi = parser.add_argument_group(
      "multi-process (see launch/README.md)",
      "Not needed for one process, under SLURM (srun) or on a TPU pod slice, where "
      "JAX finds its peers itself. Defaults: $FPDM_COORDINATOR, $FPDM_NUM_PROCESSES, "
      "$FPDM_PROCESS_ID, $FPDM_CPU_COLLECTIVES.")
  multi.add_argument("--coordinator", help="host:port of process 0's coordinator service")
  multi.add_argument("--num-processes", type=int, help="how many processes take part")
  multi.add_argument("--process-id", type=int, help="this process's index, 0..N-1")
  multi.add_argument("--cpu-collectives", choices=("gloo", "mpi"),
                     help="cross-process collectives for the CPU backend (local tests)")
  args = parser.parse_args(rest)
  setup_logging()
  if "://" in args.workdir:
    # pathlib would turn gs://b/run into a local folder "gs:/b/run" on every host.
    print(f"error: --workdir {args.workdir}: remote URLs are not supported yet; mount the "
          "bucket (launch/tpu_pod.sh uses gcsfuse) and pass the mount path", file=sys.stderr)
    return 2
  try:
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  use_compilation_cache(config.train.compilation_cache_dir)
  from fpdm_jax import distributed
  try:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           cpu_collectives=args.cpu_collectives)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from fpdm_jax import feature_cache
  from fpdm_jax.trainers import common, loop
  try:
    summary = loop.train_and_evaluate(config, args.workdir)
  except common.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except (FileNotFoundError, feature_cache.CacheMismatch) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  logging.info("Done: %s", summary)
  return 0


if __name__ == "__main__":
  from fpdm_jax import host_memory
  host_memory.reexec_with_malloc_tunables()  # before JAX starts; see its docstring
  sys.exit(main())
