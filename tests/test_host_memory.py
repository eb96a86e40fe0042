"""fpdm_jax.host_memory: entry points re-execute under glibc malloc tunables
that stop XLA:CPU steps from faulting their buffers in 4 KiB at a time.

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
# tunables it ran under and the median minor page faults of calls 9-16.
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
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "faults": statistics.median(faults[8:])}))
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
          if k not in ("GLIBC_TUNABLES", host_memory.ENV_OPT_OUT)}
  log = tmp_path / f"starts-{len(list(tmp_path.iterdir()))}.txt"
  proc = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True,
                        cwd=REPO, env={**keep, "JAX_PLATFORMS": "cpu", **env}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), len(log.read_text().splitlines())


@needs_glibc
def test_entry_point_reexecutes_once_and_step_buffers_stop_faulting(tmp_path):
  default, starts = _child(tmp_path, **{host_memory.ENV_OPT_OUT: "0"})
  assert (default["tunables"], starts) == ("", 1)
  ours, starts = _child(tmp_path)
  assert starts == 2, "should re-execute exactly once"
  assert ours["tunables"] == host_memory.with_tunables("")
  if not _thp_available():
    pytest.skip("transparent huge pages are off on this kernel; nothing to measure")
  pages = 96 * 2**20 // os.sysconf("SC_PAGE_SIZE")
  # glibc's defaults: each call's 96 MiB output is a fresh mmap, every 4 KiB page faults.
  assert default["faults"] > 0.9 * pages, default
  # Huge pages, 2 MiB per fault (measured: 560 faults per call against 24577).
  assert ours["faults"] < 0.1 * pages, (default, ours)


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
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(host_memory.ENV_OPT_OUT, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  env = host_memory.wanted_environment()
  assert env is not None and env["GLIBC_TUNABLES"] == host_memory.with_tunables("")
  monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
  assert host_memory.wanted_environment() is None  # so the re-executed run goes on
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv(host_memory.ENV_OPT_OUT, "0")
  assert host_memory.wanted_environment() is None
  monkeypatch.delenv(host_memory.ENV_OPT_OUT)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.wanted_environment() is None


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
