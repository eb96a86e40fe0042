"""fpdm_jax.host_memory: glibc keeps the memory an XLA:CPU step frees.

Each case runs in a fresh interpreter, because malloc settings are
process-wide and cannot be undone, and the "before" numbers need a process
that never had them. The measure is page faults (``ru_minflt``), which the
settings exist to avoid and which, unlike time, do not depend on the load.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpdm_jax import host_memory

REPO = Path(__file__).resolve().parents[1]

# Doubles a 32 MiB array 30 times: XLA:CPU allocates a 32 MiB output per call
# and the previous one is freed in between. Prints what apply_if_cpu returned
# and the minor page faults per call after warm-up.
CHILD = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from fpdm_jax import host_memory
applied = host_memory.apply_if_cpu() if sys.argv[1] == "apply" else None
f = jax.jit(lambda x: x * 2)
x = jnp.ones((8, 1024, 1024), jnp.float32)
for _ in range(10):
  f(x).block_until_ready()
calls = 30
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(calls):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
print(json.dumps({"applied": applied, "faults_per_call": faults}))
"""

pytestmark = pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc's mallopt")


def _child(mode: str, **env) -> dict:
  base = {k: v for k, v in os.environ.items()
          if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", host_memory.ENV_OPT_OUT)}
  proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                        cwd=REPO, env={**base, **env}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_step_memory_is_reused_instead_of_faulted_in_again():
  pages = 32 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  default = _child("default")
  # glibc's default: the 32 MiB output is a fresh mmap each call, every page faults.
  assert default["faults_per_call"] > 0.9 * pages, default
  applied = _child("apply")
  assert applied["applied"] is True
  # With the settings the output comes from heap memory an earlier call freed
  # (measured here: 400-600 faults per call against 8192).
  assert applied["faults_per_call"] < 0.25 * pages, (default, applied)


def test_opt_out_and_the_users_own_malloc_settings_are_respected():
  assert _child("apply", **{host_memory.ENV_OPT_OUT: "0"})["applied"] is False
  assert _child("apply", MALLOC_TRIM_THRESHOLD_="1000000")["applied"] is False
