"""Builds fpdm_jax's native pieces; everything else is in pyproject.toml.

- ``fpdm_jax/native/block_pool.c`` becomes ``fpdm_jax/_block_pool*.so``, which
  CPU-only entry points LD_PRELOAD (fpdm_jax/host_memory.py says why).
- ``fpdm_jax/native/*.cc`` become ``fpdm_jax/_native*.so``, XLA FFI custom
  calls for thin convolutions, softmax attention, LayerNorm and the AdamW update, built
  for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2) on x86 machines and plainly
  elsewhere (fpdm_jax/models/native.py picks the build the CPU can run;
  models/native_conv.py, models/native_attention.py and trainers/adamw.py
  say why they exist). It needs XLA's FFI headers, which
  jaxlib ships; pyproject's build requirements install jaxlib for this.

Both are optional: without a C/C++ compiler (or jaxlib's headers) the
install goes on, and fpdm_jax runs without them, slower on the CPU.
"""
import os
import platform
import sys

from setuptools import Extension, setup


def _ffi_include_dir() -> str | None:
  try:
    import jaxlib
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  return path if os.path.isfile(os.path.join(path, "xla", "ffi", "api", "ffi.h")) else None


def _native(name: str, arch_flags: list[str], include: str) -> Extension:
  return Extension(
      f"fpdm_jax.{name}",
      ["fpdm_jax/native/conv_forward.cc", "fpdm_jax/native/conv_kernel_gradient.cc",
       "fpdm_jax/native/winograd.cc", "fpdm_jax/native/attention.cc",
       "fpdm_jax/native/adamw.cc", "fpdm_jax/native/layer_norm.cc"],
      depends=["fpdm_jax/native/accumulate.h", "fpdm_jax/native/common.h",
               "fpdm_jax/native/thin_conv.h"], include_dirs=[include],
      language="c++", optional=True,
      # -fno-math-errno: nothing reads errno, and sqrt becomes an instruction
      # that loops can vectorise (adamw.cc's update).
      extra_compile_args=["-std=c++17", "-O3", "-fno-math-errno", "-fvisibility=hidden",
                          "-Wno-psabi", "-Wno-attributes", *arch_flags])


ext_modules = []
if sys.platform.startswith("linux"):
  ext_modules.append(Extension(
      "fpdm_jax._block_pool", ["fpdm_jax/native/block_pool.c"],
      extra_compile_args=["-O2", "-fvisibility=default"], libraries=["dl", "pthread"],
      optional=True))
  include = _ffi_include_dir()
  if include is None:
    print("setup.py: jaxlib's XLA FFI headers not found; the native custom calls are not built",
          file=sys.stderr)
  elif platform.machine().lower() in ("x86_64", "amd64"):
    ext_modules += [_native("_native_v4", ["-march=x86-64-v4"], include),
                    _native("_native_v3", ["-march=x86-64-v3"], include)]
  else:
    ext_modules.append(_native("_native", [], include))

setup(ext_modules=ext_modules)
