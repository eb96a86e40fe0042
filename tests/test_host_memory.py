"""fpdm_jax.host_memory: entry points re-execute under glibc malloc tunables
that stop XLA:CPU steps from faulting their buffers in 4 KiB at a time, and
with the block pool preloaded, which stops them faulting at all.

The end-to-end case runs fresh interpreters, because glibc reads tunables
only at process start, and the "before" numbers need a process without them.
The measure is page faults (``ru_minflt``), which the tunables exist to
reduce and which, unlike time, do not depend on the load.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpdm_jax import host_memory

REPO = Path(__file__).resolve().parents[1]

# Logs each start to argv[1], re-executes like an entry point, then doubles a
# 96 MiB array 16 times: XLA:CPU allocates a 96 MiB output per call on its
# worker thread and the previous one is freed in between. Prints the
# tunables and preload it ran under, the median minor page faults of calls
# 9-16, and the bits of a result computed through big temporaries.
CHILD = r"""
import json, os, resource, statistics, sys
with open(sys.argv[1], "a") as log:
  log.write("start\n")
from fpdm_jax import host_memory
host_memory.reexec_with_malloc_tunables()
import jax, jax.numpy as jnp
x = jnp.ones((24, 1024, 1024), jnp.float32)
double = jax.jit(lambda x: x * 2)
faults = []
for _ in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  double(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
w = jax.random.normal(jax.random.key(0), (2048, 2048))
chain = jax.jit(lambda x: jnp.tanh(jnp.tanh(x.reshape(-1, 2048) @ w) @ w).sum())
result = [float(chain(x * i)).hex() for i in range(3)]
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "preload": os.environ.get("LD_PRELOAD", ""),
                  "faults": statistics.median(faults[8:]), "result": result}))
"""

needs_glibc = pytest.mark.skipif(
    (host_memory.glibc_version() or (0, 0)) < host_memory.MIN_GLIBC
    or not sys.platform.startswith("linux"), reason="needs Linux with glibc >= 2.35")


def _thp_available() -> bool:
  try:
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return False
  return "[never]" not in mode


def _child(tmp_path, **env) -> tuple[dict, int]:
  keep = {k: v for k, v in os.environ.items()
          if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", host_memory.ENV_OPT_OUT,
                       host_memory.ENV_POOL_OPT_OUT)}
  log = tmp_path / f"starts-{len(list(tmp_path.iterdir()))}.txt"
  proc = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True,
                        cwd=REPO, env={**keep, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), len(log.read_text().splitlines())


@needs_glibc
def test_entry_point_reexecutes_once_and_step_buffers_stop_faulting(tmp_path):
  default, starts = _child(tmp_path, **{host_memory.ENV_OPT_OUT: "0"})
  assert (default["tunables"], default["preload"], starts) == ("", "", 1)
  tunables, starts = _child(tmp_path, **{host_memory.ENV_POOL_OPT_OUT: "0"})
  assert (tunables["tunables"], tunables["preload"], starts) == (
      host_memory.with_tunables(""), "", 2)
  ours, starts = _child(tmp_path)
  assert starts == 2, "should re-execute exactly once"
  assert ours["tunables"] == host_memory.with_tunables("")
  library = host_memory.block_pool_library()
  assert ours["preload"] == (library or "")
  # The allocator changes where buffers live, never what is computed.
  assert default["result"] == tunables["result"] == ours["result"]
  if not _thp_available():
    pytest.skip("transparent huge pages are off on this kernel; nothing to measure")
  pages = 96 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  # glibc's defaults: each call's 96 MiB output is a fresh mmap, every 4 KiB page faults.
  assert default["faults"] > 0.9 * pages, default
  # Huge pages, 2 MiB per fault (measured: 560 faults per call against 24577).
  assert tunables["faults"] < 0.1 * pages, (default, tunables)
  if library:
    # The pool hands the freed 96 MiB block to the next call (measured: 0).
    assert ours["faults"] < 0.1 * tunables["faults"], (tunables, ours)


def test_users_tunables_win_and_ours_are_added_once():
  merged = host_memory.with_tunables("glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=0")
  items = merged.split(":")
  assert items[:2] == ["glibc.malloc.hugetlb=0", "glibc.malloc.tcache_count=0"]
  assert "glibc.malloc.hugetlb=1" not in items
  assert {i.split("=")[0] for i in items} == set(host_memory.TUNABLES) | {
      "glibc.malloc.tcache_count"}
  assert host_memory.with_tunables(merged) == merged


@needs_glibc
def test_only_on_cpu_only_hosts_and_not_when_opted_out_or_already_set(monkeypatch):
  for name in ("GLIBC_TUNABLES", "LD_PRELOAD", host_memory.ENV_OPT_OUT,
               host_memory.ENV_POOL_OPT_OUT):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  env = host_memory.wanted_environment()
  assert env is not None and env["GLIBC_TUNABLES"] == host_memory.with_tunables("")
  library = host_memory.block_pool_library()
  assert env.get("LD_PRELOAD") == library
  monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
  if library:  # the tunables alone are not all of it
    assert host_memory.wanted_environment()["LD_PRELOAD"] == library
    monkeypatch.setenv("LD_PRELOAD", library)
  assert host_memory.wanted_environment() is None  # so the re-executed run goes on
  monkeypatch.setenv(host_memory.ENV_POOL_OPT_OUT, "0")
  if library:  # inherited from a parent that had it: taken out again
    assert host_memory.wanted_environment()["LD_PRELOAD"] == ""
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  assert host_memory.wanted_environment() is None  # tunables set, pool not wanted
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv(host_memory.ENV_OPT_OUT, "0")
  assert host_memory.wanted_environment() is None
  monkeypatch.delenv(host_memory.ENV_OPT_OUT)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.wanted_environment() is None


def test_the_pool_joins_the_users_preloads_once():
  assert host_memory.with_preload("", "/p/pool.so") == "/p/pool.so"
  assert host_memory.with_preload("/a.so /b.so", "/p/pool.so") == "/a.so:/b.so:/p/pool.so"
  assert host_memory.with_preload("/a.so:/p/pool.so", "/p/pool.so") == "/a.so:/p/pool.so"
  assert host_memory.with_preload("/a.so:/p/pool.so", "/p/pool.so", wanted=False) == "/a.so"


def test_cpu_only_reads_jax_platforms(monkeypatch):
  for value, cpu in (("cpu", True), ("cpu, cpu", True), ("tpu", False), ("cuda,cpu", False)):
    monkeypatch.setenv("JAX_PLATFORMS", value)
    assert host_memory.cpu_only() is cpu, value


@needs_glibc
def test_a_failed_reexec_warns_and_the_run_goes_on(monkeypatch, caplog):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(host_memory.ENV_OPT_OUT, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")

  def refuse(*args):
    raise PermissionError("not executable")

  monkeypatch.setattr(os, "execve", refuse)
  host_memory.reexec_with_malloc_tunables()
  assert "could not re-execute" in caplog.text and "not executable" in caplog.text
