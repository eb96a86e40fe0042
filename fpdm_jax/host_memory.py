"""glibc malloc settings for XLA:CPU: keep the memory a step frees for the next step.

Why: XLA:CPU mallocs each execution's temporaries and outputs and frees them
when the execution ends: 605 MiB of temporaries for the small UNet's train
step at batch 8, 1.6 GiB for the medium one. The execution runs on one of
XLA's worker threads, and glibc serves a large block on a worker thread's
arena with a fresh ``mmap`` (any block over its mmap threshold, at most 32
MiB; and always beyond 64 MiB there) that it ``munmap``\\s again on free. So
on every step the kernel faulted in and zeroed all of it again, 4 KiB at a
time: 204k page faults per small b8 step, whose JAX time went from 1.58 s to
1.25 s with the settings below and no faults at all (benchmarks/README.md,
finding 13).

The settings: one arena for all threads (``M_ARENA_MAX=1``, so XLA's workers
allocate from the main heap), no mmap for large blocks (``M_MMAP_MAX=0``), and
freed memory kept (a high ``M_TRIM_THRESHOLD``), so the next step reuses
pages that are already mapped. The cost: resident memory stays at its peak
instead of shrinking between steps, and threads share one malloc lock.

When: ``M_ARENA_MAX`` only binds threads that have not allocated yet, so this
runs when ``fpdm_jax`` is imported, before JAX starts its thread pools, and
only where JAX can compute on nothing but the CPU (``JAX_PLATFORMS`` is cpu,
or no GPU/TPU plugin is installed): on accelerator hosts the steps run in
device memory and the host keeps glibc's defaults. Nothing happens without
glibc, when any of ``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_`` is set (your settings win), or with
``FPDM_CPU_MALLOC_DEFAULTS=0``.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os

from fpdm_jax import xla_cpu_flags

ENV_OPT_OUT = "FPDM_CPU_MALLOC_DEFAULTS"

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = (
    # (mallopt parameter, value, the environment variable glibc reads for it)
    (M_ARENA_MAX, 1, "MALLOC_ARENA_MAX"),
    (M_MMAP_MAX, 0, "MALLOC_MMAP_MAX_"),
    # mallopt takes a C int: glibc still trims beyond ~2 GiB of free memory
    # at the top of the heap, more than any step here frees.
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


def cpu_only() -> bool:
  """Whether JAX can only compute on the CPU in this process, known without
  starting JAX: ``JAX_PLATFORMS`` names only cpu, or it is unset and no
  accelerator plugin (a ``jax_plugins`` package or entry point, libtpu) is
  installed for JAX to find."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(","))
  if importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins"):
    return False
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def apply() -> bool:
  """Set the malloc parameters above in this process; True if glibc took them.

  Idempotent. Skipped (False) when opted out, without glibc, when the
  environment already sets any of the parameters, or when an accelerator
  may be used (``cpu_only``).
  """
  global _applied
  if _applied:
    return True
  if xla_cpu_flags.opted_out(ENV_OPT_OUT):
    return False
  if any(env in os.environ for _, _, env in SETTINGS):
    return False
  libc = _glibc()
  if libc is None or not cpu_only():
    return False
  ok = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
           for param, value, _ in SETTINGS)
  if not ok:
    logging.warning("host_memory: glibc refused a mallopt setting; XLA:CPU steps may "
                    "spend time in page faults (see fpdm_jax/host_memory.py)")
  _applied = ok
  return ok
