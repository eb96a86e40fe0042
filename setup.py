"""Builds fpdm_jax's one native piece; everything else is in pyproject.toml.

``fpdm_jax/native/block_pool.c`` becomes ``fpdm_jax/_block_pool*.so``, which
CPU-only entry points LD_PRELOAD (fpdm_jax/host_memory.py says why). It is
optional: without a C compiler the install goes on and the entry points run
with glibc's allocator alone.
"""
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
  ext_modules.append(Extension(
      "fpdm_jax._block_pool", ["fpdm_jax/native/block_pool.c"],
      extra_compile_args=["-O2", "-fvisibility=default"], libraries=["dl", "pthread"],
      optional=True))

setup(ext_modules=ext_modules)
