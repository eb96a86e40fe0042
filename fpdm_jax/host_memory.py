"""Host memory for XLA:CPU steps: huge pages (glibc tunables), and a pool
that keeps the biggest step buffers mapped from one step to the next.

Why: XLA:CPU mallocs each execution's temporaries and outputs and frees them
when the execution ends: 605 MiB of temporaries for the small UNet's train
step at batch 8, 1.6 GiB for the medium one. glibc serves blocks that large
with a fresh ``mmap`` (on XLA's worker threads always, beyond 64 MiB) and
``munmap``\\s them on free, so on every step the kernel faulted in and zeroed
all of it again, 4 KiB at a time: 204k page faults per small b8 step.
With the tunables below the same step takes about 3.8k faults and its time
fell from ~1.7 s to ~1.2 s (benchmarks/README.md, finding 14):

- ``glibc.malloc.hugetlb=1``: glibc asks for transparent huge pages
  (``madvise``) on the memory it maps, so a fault brings in 2 MiB, not 4 KiB.
- ``glibc.malloc.trim_threshold``: keep freed memory at the top of a heap
  instead of returning it. Without this, sampling got 30 % slower: its small
  blocks kept shrinking and regrowing the heaps, and each regrowth now
  zeroed a whole 2 MiB page.
- ``glibc.malloc.mmap_threshold=32 MiB``: setting the trim threshold switches
  off glibc's sliding mmap threshold, which would otherwise have risen to
  this, its maximum; below it blocks come from the (kept) heaps.

The earlier attempt, one arena with no mmap at all (finding 13), removed every
fault but serialised XLA's threads on one malloc lock and slowed sampling by
20 %; these settings keep per-thread arenas.

A block pool for the biggest blocks (``fpdm_jax/native/block_pool.c``, built
into ``fpdm_jax/_block_pool*.so`` at install when a C compiler is there):
XLA:CPU's temporaries come in a few blocks of 32 MiB and more (621, 151 and
76 MiB at small b8), which glibc still maps and unmaps on every step: its
thread arenas cannot hold blocks over 64 MiB. The pool keeps them mapped after
``free`` and hands them out again, so a step stops re-faulting them (small b8:
~3.7k faults and 100-160 ms of system time per step -> 0 and ~0). On a VM that
hands freed memory back to its host, the first step after any pause had been
2-10x slower for that reason (benchmarks/README.md, findings 17 and 18). It is
loaded with ``LD_PRELOAD`` and replaces only what is 32 MiB or more; unused
blocks are kept up to ``FPDM_CPU_BLOCK_POOL_MIB`` (default 4096), so resident
memory stays near the step's peak, as with the trim threshold above.

glibc reads tunables and ``LD_PRELOAD`` only when a process starts, so the
entry points (``python -m fpdm_jax.train``, ``.sample``, ``.evaluate``,
``.demo``, the benchmarks) call ``reexec_with_malloc_tunables`` first: it
re-executes the same command once with the tunables added to
``GLIBC_TUNABLES`` and the pool to ``LD_PRELOAD``. It does so only on Linux
with glibc >= 2.35, where JAX can compute on nothing but the CPU
(``JAX_PLATFORMS`` is cpu, or no GPU/TPU plugin is installed: on accelerators
the steps run in device memory). Tunables you set in ``GLIBC_TUNABLES``
yourself win; ``FPDM_CPU_MALLOC_DEFAULTS=0`` adds nothing at all,
``FPDM_CPU_BLOCK_POOL=0`` leaves out the pool only. Child processes (data
loader workers) inherit both.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import sys

from fpdm_jax import xla_cpu_flags

ENV_OPT_OUT = "FPDM_CPU_MALLOC_DEFAULTS"
ENV_POOL_OPT_OUT = "FPDM_CPU_BLOCK_POOL"

TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    # About 2 GiB: more than any step here frees, so in practice "never trim".
    "glibc.malloc.trim_threshold": str(2**31 - 1),
    "glibc.malloc.mmap_threshold": str(32 * 2**20),
}
# glibc.malloc.hugetlb first appeared in glibc 2.35; older ones ignore it.
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, int] | None:
  """The running C library's version if it is glibc, else None."""
  try:
    name = os.confstr("CS_GNU_LIBC_VERSION") or ""
  except (AttributeError, ValueError, OSError):  # not glibc, or not POSIX
    return None
  if not name.startswith("glibc "):
    return None
  major, minor = name.split()[1].split(".")[:2]
  return int(major), int(minor)


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


def with_tunables(glibc_tunables: str, tunables: dict[str, str] = TUNABLES) -> str:
  """``glibc_tunables`` (``name=value:name=value``) plus every tunable of ours
  it does not already set."""
  items = [item for item in glibc_tunables.split(":") if item]
  present = {item.split("=", 1)[0] for item in items}
  return ":".join(items + [f"{name}={value}" for name, value in tunables.items()
                           if name not in present])


def block_pool_library() -> str | None:
  """Path of the block pool built at install (``fpdm_jax/_block_pool*.so``),
  or None if it was not built (no C compiler then, or not Linux)."""
  here = os.path.dirname(os.path.abspath(__file__))
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = os.path.join(here, "_block_pool" + suffix)
    if os.path.isfile(path):
      return path
  return None


def with_preload(ld_preload: str, library: str, wanted: bool = True) -> str:
  """``ld_preload`` (libraries separated by colons or spaces) with ``library``
  added after the user's own unless it is already there, or with it taken
  out if not ``wanted`` (a child told ``FPDM_CPU_BLOCK_POOL=0`` may have
  inherited it from its parent)."""
  items = [item for item in ld_preload.replace(" ", ":").split(":") if item]
  others = [item for item in items if item != library]
  if not wanted:
    return ":".join(others)
  return ":".join(items if library in items else others + [library])


def wanted_environment() -> dict[str, str] | None:
  """The environment this process should run under, or None if it already
  does or the tunables do not apply here (see the module docstring)."""
  if xla_cpu_flags.opted_out(ENV_OPT_OUT):
    return None
  version = glibc_version()
  if version is None or version < MIN_GLIBC or not sys.platform.startswith("linux"):
    return None
  if not sys.executable:  # an embedded interpreter: nothing to re-execute
    return None
  wanted = {"GLIBC_TUNABLES": with_tunables(os.environ.get("GLIBC_TUNABLES", ""))}
  library = block_pool_library()
  if library:
    wanted["LD_PRELOAD"] = with_preload(os.environ.get("LD_PRELOAD", ""), library,
                                        wanted=not xla_cpu_flags.opted_out(ENV_POOL_OPT_OUT))
  if all(os.environ.get(k, "") == v for k, v in wanted.items()) or not cpu_only():
    return None
  return {**os.environ, **wanted}


def reexec_with_malloc_tunables() -> None:
  """Replaces this process with the same command run under ``TUNABLES`` and
  the block pool, unless it already runs under them or they do not apply.
  Call it first thing in a ``__main__`` block, before JAX starts: everything
  done before is lost. Never returns when it re-executes; the second run
  finds its environment set.
  If the re-exec itself fails, warns and returns: the run goes on without."""
  env = wanted_environment()
  if env is None:
    return
  logging.debug("host_memory: re-executing with GLIBC_TUNABLES=%s LD_PRELOAD=%s",
                env["GLIBC_TUNABLES"], env.get("LD_PRELOAD", ""))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # the run itself is still fine, just without the tunables
    logging.warning("host_memory: could not re-execute %s with GLIBC_TUNABLES and the "
                    "block pool (%s); continuing with glibc's malloc defaults (slower CPU "
                    "steps). Set FPDM_CPU_MALLOC_DEFAULTS=0 to skip this attempt.",
                    sys.executable, e)
