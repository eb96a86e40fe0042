"""Multi-process start-up: ``jax.distributed.initialize`` when it is needed.

Single-process runs need nothing. On a TPU pod slice or under SLURM JAX
finds its peers itself; elsewhere set FPDM_COORDINATOR (host:port),
FPDM_NUM_PROCESSES and FPDM_PROCESS_ID.
"""
from __future__ import annotations

import os

import jax


def initialize_from_env() -> None:
  if os.environ.get("FPDM_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["FPDM_COORDINATOR"],
        num_processes=int(os.environ["FPDM_NUM_PROCESSES"]),
        process_id=int(os.environ["FPDM_PROCESS_ID"]))
  elif os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()
