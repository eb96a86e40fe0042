"""fpdm_jax/native/block_pool.c: the allocator the CPU entry points preload.

Each case runs a fresh interpreter with the library in ``LD_PRELOAD`` and
drives the C allocation functions through ctypes, so what is checked is the
contract every caller in the process (XLA, torch, Python) relies on: blocks
come back aligned, zeroed where asked, with their contents kept on realloc,
freed blocks are reused, the cap unmaps, small blocks stay glibc's, and a
fork()ed child can still allocate.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from fpdm_jax import host_memory

LIBRARY = host_memory.block_pool_library()
MIB = 2**20

if LIBRARY is None:
  if sys.platform.startswith("linux") and (shutil.which("cc") or shutil.which("gcc")):
    pytest.fail("fpdm_jax/_block_pool*.so is missing although a C compiler is installed: "
                "re-run `pip install -e .` (or `make install`) and read its build output",
                pytrace=False)
  pytest.skip("the block pool is built only on Linux with a C compiler", allow_module_level=True)

PRELUDE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None)
for name, res, args in (("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
                        ("calloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
                        ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                        ("aligned_alloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
                        ("posix_memalign", ctypes.c_int,
                         [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]),
                        ("malloc_usable_size", ctypes.c_size_t, [ctypes.c_void_p]),
                        ("free", None, [ctypes.c_void_p])):
  fn = getattr(libc, name); fn.restype = res; fn.argtypes = args
MIB = 2**20
def mapped(p):
  for line in open("/proc/self/maps"):
    lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
    if lo <= p < hi:
      return True
  return False
out = {}
"""


def _run(body: str, **env) -> dict:
  code = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "LD_PRELOAD": LIBRARY, **env})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_freed_big_block_is_reused_and_stays_mapped():
  out = _run("""
      p = libc.malloc(40 * MIB)
      ctypes.memset(p, 7, 40 * MIB)
      out["usable"] = libc.malloc_usable_size(p)
      libc.free(p)
      out["mapped_after_free"] = mapped(p)
      q = libc.malloc(38 * MIB)  # a little smaller still fits the kept block
      out["reused"] = q == p
      r = libc.malloc(40 * MIB)  # while q is in use, a new block
      out["second_is_new"] = r not in (p, q)
      libc.free(q); libc.free(r)
      big = libc.malloc(200 * MIB)  # far larger than both: not served from them
      out["big_is_new"] = big not in (p, r)
      libc.free(big)
  """)
  assert out["usable"] >= 40 * MIB
  assert out == {**out, "mapped_after_free": True, "reused": True, "second_is_new": True,
                 "big_is_new": True}


def test_alignment_zeroing_and_realloc_keep_their_contracts():
  out = _run("""
      p = ctypes.c_void_p()
      out["posix_memalign"] = libc.posix_memalign(ctypes.byref(p), 4096, 40 * MIB)
      out["aligned_4096"] = p.value % 4096 == 0
      ctypes.memset(p, 0xAB, 40 * MIB)
      libc.free(p)
      z = libc.calloc(10, 4 * MIB)  # reuses the block that was just filled with 0xAB
      out["calloc_reused"] = abs(z - p.value) < 2 * MIB  # same block, alignment 64 now
      out["calloc_zero"] = ctypes.string_at(z, 40 * MIB).count(0) == 40 * MIB
      a = libc.aligned_alloc(2 * MIB, 64 * MIB)
      out["aligned_2mib"] = a % (2 * MIB) == 0
      pattern = bytes(range(256)) * (40 * MIB // 256)
      ctypes.memmove(z, pattern, len(pattern))
      g = libc.realloc(z, 100 * MIB)  # grows: moves, keeps the contents
      out["realloc_kept"] = ctypes.string_at(g, len(pattern)) == pattern
      s = libc.realloc(g, 50 * MIB)  # shrinks: stays where it is
      out["shrink_in_place"] = s == g
      out["posix_memalign_bad"] = libc.posix_memalign(ctypes.byref(p), 3, 40 * MIB)
      for x in (a, s):
        libc.free(x)
      libc.free(None)
  """)
  assert out == {"posix_memalign": 0, "aligned_4096": True, "calloc_reused": True,
                 "calloc_zero": True, "aligned_2mib": True, "realloc_kept": True,
                 "shrink_in_place": True, "posix_memalign_bad": 22}  # EINVAL


def test_small_blocks_stay_glibcs_and_the_cap_unmaps():
  body = """
      small = libc.malloc(1000)
      out["small_usable"] = libc.malloc_usable_size(small)
      out["small_header"] = ctypes.string_at(small - 16, 16).hex()
      libc.free(small)
      p = libc.malloc(40 * MIB)
      libc.free(p)
      out["mapped_after_free"] = mapped(p)
  """
  kept = _run(body)
  capped = _run(body, FPDM_CPU_BLOCK_POOL_MIB="0")
  assert 1000 <= kept["small_usable"] < 4096
  assert "66646d6c6f6f7031" not in kept["small_header"]  # the pool's magic word
  assert kept["mapped_after_free"] and not capped["mapped_after_free"]
  # Below the threshold (here 64 MiB) requests go to glibc, which unmaps on free.
  below = _run(body, FPDM_CPU_BLOCK_POOL_MIN_MIB="64")
  assert not below["mapped_after_free"]


def test_oldest_unused_blocks_go_first_when_over_the_cap():
  out = _run("""
      a, b = libc.malloc(40 * MIB), libc.malloc(40 * MIB)
      libc.free(a); libc.free(b)  # 2 x 42 MiB unused, cap 110: both kept
      out["both_kept"] = mapped(a) and mapped(b)
      c = libc.malloc(60 * MIB)  # new (too big for either), then freed: over the cap
      libc.free(c)
      out["oldest_gone"] = not mapped(a)
      out["newer_kept"] = mapped(b) and mapped(c)
  """, FPDM_CPU_BLOCK_POOL_MIB="110")
  assert out == {"both_kept": True, "oldest_gone": True, "newer_kept": True}


def test_a_forked_child_allocates_while_threads_use_the_pool():
  out = _run("""
      import threading
      stop = threading.Event()
      def churn():
        while not stop.is_set():
          libc.free(libc.malloc(40 * MIB))
      threads = [threading.Thread(target=churn) for _ in range(2)]
      for t in threads: t.start()
      codes = []
      for _ in range(20):
        pid = os.fork()
        if pid == 0:
          p = libc.malloc(40 * MIB); ctypes.memset(p, 1, 40 * MIB); libc.free(p)
          os._exit(0)
        codes.append(os.waitpid(pid, 0)[1])
      stop.set()
      for t in threads: t.join()
      out["codes"] = codes
  """)
  assert out["codes"] == [0] * 20
