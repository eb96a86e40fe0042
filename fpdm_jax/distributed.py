"""Multi-process start-up: ``jax.distributed.initialize`` when, and only when, needed.

Call ``initialize()`` once, before anything touches a JAX device. It decides
from explicit arguments, then the environment:

1. ``coordinator`` / ``FPDM_COORDINATOR`` (host:port) with ``num_processes`` /
   ``FPDM_NUM_PROCESSES`` and ``process_id`` / ``FPDM_PROCESS_ID``: exactly
   those (any cluster, local multi-process CPU runs).
2. ``FPDM_DISTRIBUTED=auto`` (the default): let JAX detect the cluster when
   one is there: a SLURM step with more than one task (``srun``), an Open MPI
   launch (``mpirun``) with more than one rank, or a Cloud TPU VM (a pod
   slice's workers find each other through the TPU metadata).
3. ``FPDM_DISTRIBUTED=on``: call ``jax.distributed.initialize()`` and let JAX
   auto-detect everything (fails loudly if it cannot); ``off``: never.

A single process on one machine (one or several GPUs, one TPU VM host or a
CPU) needs nothing: JAX already sees all local devices.

``FPDM_CPU_COLLECTIVES`` (``gloo`` or ``mpi``) selects the cross-process
collectives of the CPU backend (``jax_cpu_collectives_implementation``) and
turns the persistent compilation cache off
(``_no_persistent_cache_with_cpu_collectives``); the local multi-process CPU
runs (tests, ``launch/local_multiprocess.sh``) use ``gloo``. ``FPDM_INIT_TIMEOUT`` (seconds, default 300) bounds how long a
process waits for its peers.
"""
from __future__ import annotations

import glob
import logging
import os

import jax

ENV_COORDINATOR = "FPDM_COORDINATOR"
ENV_NUM_PROCESSES = "FPDM_NUM_PROCESSES"
ENV_PROCESS_ID = "FPDM_PROCESS_ID"
ENV_MODE = "FPDM_DISTRIBUTED"
ENV_CPU_COLLECTIVES = "FPDM_CPU_COLLECTIVES"
ENV_INIT_TIMEOUT = "FPDM_INIT_TIMEOUT"


def _int_env(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
  """TPU chips attached to this VM (what JAX's own TPU detection looks at)."""
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # private API moved: fall back to the device files
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_cluster() -> str | None:
  """The cluster ``jax.distributed.initialize()`` would find here, or None."""
  if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_NODELIST") \
      and (_int_env("SLURM_NTASKS") or 1) > 1:
    return "slurm"
  if (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
    return "openmpi"
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or _on_cloud_tpu_vm():
    return "tpu"
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str | None = None,
               mode: str | None = None, timeout: int | None = None) -> bool:
  """Joins the other processes if there are any; returns whether it did.

  Arguments win over the ``FPDM_*`` environment variables (module docstring).
  """
  coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
  mode = (mode or os.environ.get(ENV_MODE) or "auto").lower()
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"{ENV_MODE}={mode!r}: use auto, on or off")
  cpu_collectives = cpu_collectives or os.environ.get(ENV_CPU_COLLECTIVES) or None
  timeout = timeout if timeout is not None else (_int_env(ENV_INIT_TIMEOUT) or 300)

  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    _no_persistent_cache_with_cpu_collectives()
  if mode == "off":
    return False
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError(f"with a coordinator ({coordinator}) set both the number of processes "
                       f"({ENV_NUM_PROCESSES} / --num-processes) and this process's id "
                       f"({ENV_PROCESS_ID} / --process-id)")
    if num_processes == 1:
      return False
    logging.info("jax.distributed: process %d of %d, coordinator %s", process_id,
                 num_processes, coordinator)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout)
    return True
  if num_processes is not None or process_id is not None:
    raise ValueError(f"--num-processes/--process-id need a coordinator address "
                     f"({ENV_COORDINATOR} / --coordinator)")
  cluster = detect_cluster() if mode == "auto" else "auto-detected"
  if cluster is None:
    return False
  logging.info("jax.distributed: initialising from the %s environment", cluster)
  jax.distributed.initialize(initialization_timeout=timeout,
                             local_device_ids=_slurm_local_devices())
  return True


def _no_persistent_cache_with_cpu_collectives() -> None:
  """Turns JAX's persistent compilation cache off for CPU-collective runs.

  Two local CPU processes whose train step came from the persistent cache
  (``JAX_COMPILATION_CACHE_DIR``) hung in the step's first collectives, or
  gloo reported "collective mismatch", in 11 of 12 runs on a 2-core machine
  (1 or 2 devices per process); compiling the step themselves, the same
  processes passed 7 runs of 7 (tests/test_multiprocess.py). A CPU program is cheap to
  recompile, so the cache is not worth the hang. Accelerator runs keep it.
  """
  if jax.config.jax_enable_compilation_cache and (
      jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")):
    logging.warning("CPU collectives (%s): the persistent compilation cache is turned off; "
                    "programs loaded from it hang in cross-process collectives",
                    ENV_CPU_COLLECTIVES)
  jax.config.update("jax_enable_compilation_cache", False)


def _slurm_local_devices() -> list[int] | None:
  """Under SLURM JAX assumes one task per GPU and shows task i only GPU
  SLURM_LOCALID. With one task per node (launch/slurm.sbatch) that task must
  see all the node's GPUs. JAX_LOCAL_DEVICE_IDS, when set, wins."""
  if not os.environ.get("SLURM_JOB_ID") or os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get(
      "SLURM_NTASKS_PER_NODE", ""))
  gpus = _int_env("SLURM_GPUS_ON_NODE")
  if gpus and per_node.split("(")[0] == "1":
    return list(range(gpus))
  return None


def initialize_from_env() -> bool:
  """``initialize()`` configured by the environment only."""
  return initialize()
