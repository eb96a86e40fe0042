"""fpdm_jax.host_memory: glibc keeps the memory an XLA:CPU step frees.

Each case runs in a fresh interpreter, because malloc settings are
process-wide, cannot be undone, and have to be in place before JAX starts its
threads; the "before" numbers need a process that never had them. The measure
is page faults (``ru_minflt``), which the settings exist to avoid and which,
unlike time, do not depend on the load.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpdm_jax import host_memory

REPO = Path(__file__).resolve().parents[1]

# Imports fpdm_jax (which applies the settings), then doubles a 96 MiB array
# 16 times: XLA:CPU allocates a 96 MiB output per call on its worker thread,
# and the previous one is freed in between. A cumulative sum keeps a 96 MiB
# temporary. The doubling runs again from a new thread: glibc gives each
# thread its own arena, which always mmaps blocks above 64 MiB, so this checks
# that threads share the main arena (XLA runs steps on its worker threads).
# Prints whether the settings were applied and the median minor
# page faults of calls 9-16 (the heap grows for the first few calls, while
# earlier outputs are still being freed).
CHILD = r"""
import json, resource, statistics, sys, threading
from fpdm_jax import host_memory
out = {"applied": host_memory._applied}
if sys.argv[1:] == ["--applied-only"]:
  print(json.dumps(out))
  raise SystemExit
import jax, jax.numpy as jnp
x = jnp.ones((24, 1024, 1024), jnp.float32)

def measure(name, f):
  faults = []
  for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  out[name] = statistics.median(faults[8:])

double = jax.jit(lambda x: x * 2)
measure("output", double)
measure("temporary", jax.jit(lambda x: jnp.cumsum(x, axis=1)[:, -1]))
thread = threading.Thread(target=measure, args=("output_from_thread", double))
thread.start()
thread.join()
print(json.dumps(out))
"""

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc's mallopt")


def _child(*args, **env) -> dict:
  keep = {k: v for k, v in os.environ.items()
          if k not in [e for _, _, e in host_memory.SETTINGS] + [host_memory.ENV_OPT_OUT]}
  proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                        cwd=REPO, env={**keep, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_step_memory_is_reused_instead_of_faulted_in_again():
  pages = 96 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  default = _child(**{host_memory.ENV_OPT_OUT: "0"})
  assert default["applied"] is False
  # glibc's defaults: each call's 96 MiB output is a fresh mmap, every page faults.
  assert default["output"] > 0.9 * pages, default
  ours = _child()
  assert ours["applied"] is True
  # With the settings both come from heap memory an earlier call freed
  # (measured: 0 faults per call).
  assert ours["output"] < 0.05 * pages, (default, ours)
  assert ours["temporary"] < 0.05 * pages, (default, ours)
  assert ours["output_from_thread"] < 0.05 * pages, (default, ours)


def test_only_cpu_only_hosts_and_never_over_the_users_settings():
  assert _child("--applied-only")["applied"] is True
  assert _child("--applied-only", MALLOC_ARENA_MAX="4")["applied"] is False
  assert _child("--applied-only", JAX_PLATFORMS="cuda,cpu")["applied"] is False


def test_cpu_only_reads_jax_platforms(monkeypatch):
  for value, cpu in (("cpu", True), ("cpu, cpu", True), ("tpu", False), ("cuda,cpu", False)):
    monkeypatch.setenv("JAX_PLATFORMS", value)
    assert host_memory.cpu_only() is cpu, value
