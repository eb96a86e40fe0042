"""glibc malloc settings for XLA:CPU: keep the memory a step frees for the next step.

Why: XLA:CPU mallocs each execution's temporaries and outputs and frees them
when the execution ends: 605 MiB of temporaries for the small UNet's train
step at batch 8, 1.6 GiB for the medium one. glibc serves any allocation above
its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back
with ``munmap`` on free, so on every step the kernel has to fault in and zero
those pages again, one 4 KiB page at a time. On this project's 2-core machine
that was most of the time of a large elementwise op (doubling a 32 MiB array:
21 ms, 3.4 ms with the settings below) and a quarter of the medium UNet's
batch-8 train step (5.7 s -> 4.1 s; benchmarks/README.md, finding 13).

``M_MMAP_MAX=0`` makes glibc serve large blocks from its heap instead, and a
high ``M_TRIM_THRESHOLD`` keeps freed heap memory in the process, so the next
step reuses pages that are already mapped. The cost: the process's resident
memory stays at its peak instead of shrinking between steps (the peak itself
moved by under 3 % in the same measurement).

Only the CPU backend runs its steps in host memory, so ``apply_if_cpu`` (what
the entry points call, after JAX has chosen its backend) does nothing on
GPU/TPU hosts. Neither does anything without glibc, when ``MALLOC_MMAP_MAX_``
or ``MALLOC_TRIM_THRESHOLD_`` is already set (your choice wins), or with
``FPDM_CPU_MALLOC_DEFAULTS=0``. Settings apply to the calling process's main
arena, the one a step launched from Python's main thread allocates in.
"""
from __future__ import annotations

import ctypes
import logging
import os

from fpdm_jax import xla_cpu_flags

ENV_OPT_OUT = "FPDM_CPU_MALLOC_DEFAULTS"

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt's value is a C int; ~2 GiB of free memory at the top of the heap is
# more than any step here frees, and glibc still trims beyond it.
SETTINGS = (
    # (mallopt parameter, value, the environment variable glibc reads for it)
    (M_MMAP_MAX, 0, "MALLOC_MMAP_MAX_"),
    (M_TRIM_THRESHOLD, 2**31 - 1, "MALLOC_TRIM_THRESHOLD_"),
)

_applied = False


def _glibc():
  """The running C library if it is glibc (mallopt with these numbers), else None."""
  try:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
      return None
  except (AttributeError, ValueError, OSError):  # not glibc, or not POSIX
    return None
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "mallopt") else None


def apply() -> bool:
  """Set the malloc parameters above in this process; True if glibc took them.

  Idempotent. Skipped (False) when opted out, without glibc, or when the
  environment already sets either parameter for glibc.
  """
  global _applied
  if _applied:
    return True
  if xla_cpu_flags.opted_out(ENV_OPT_OUT):
    return False
  if any(env in os.environ for _, _, env in SETTINGS):
    logging.info("host_memory: %s set in the environment; leaving malloc as it is",
                 " / ".join(env for _, _, env in SETTINGS if env in os.environ))
    return False
  libc = _glibc()
  if libc is None:
    return False
  ok = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
           for param, value, _ in SETTINGS)
  if not ok:
    logging.warning("host_memory: glibc refused a mallopt setting; XLA:CPU steps may "
                    "spend time in page faults (see fpdm_jax/host_memory.py)")
  _applied = ok
  return ok


def apply_if_cpu() -> bool:
  """``apply()`` when JAX computes on the CPU (initialises JAX's backends, so
  call it after ``jax.distributed.initialize``)."""
  import jax
  return jax.default_backend() == "cpu" and apply()
