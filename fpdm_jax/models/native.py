"""The native XLA:CPU custom calls in fpdm_jax/native/: which build this CPU
runs, loaded and registered with XLA once per process.

Three families live in one library, each with its own Python wrappers:
``models.native_conv`` (convolutions' forwards and gradients),
``models.native_attention`` (softmax attention, forward and backward) and
``trainers.adamw`` (the AdamW update).
setup.py builds the library at install for x86-64-v4 (AVX-512) and x86-64-v3
(AVX2), or plainly on other Linux machines, as ``fpdm_jax/_native_v4*.so`` and so on;
``library()`` picks the best build this CPU can run. Without one (no C++
compiler, not Linux, an older CPU) every model keeps XLA's kernels.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
import platform

import jax

_log = logging.getLogger(__name__)

# CPU flags (/proc/cpuinfo) each x86 build needs: what GCC's -march levels
# may emit.
_X86_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# (library name under fpdm_jax/, the CPU flags it needs), best first.
_BUILDS = {
    "x86": (("_native_v4", _X86_V4), ("_native_v3", _X86_V3)),
    "other": (("_native", frozenset()),),
}


@functools.cache
def _cpu_flags() -> frozenset[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


@functools.cache
def builds() -> tuple[str, ...]:
  """Paths of the built libraries this CPU can run, best first."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  x86 = platform.machine().lower() in ("x86_64", "amd64")
  flags = _cpu_flags() if x86 else frozenset()
  found = []
  for name, needs in _BUILDS["x86" if x86 else "other"]:
    if needs <= flags:
      found += [p for p in (os.path.join(here, name + suffix)
                            for suffix in importlib.machinery.EXTENSION_SUFFIXES)
                if os.path.isfile(p)][:1]
  return tuple(found)


def library() -> str | None:
  """Path of the best build this CPU can run, or None."""
  return next(iter(builds()), None)


# (target name suffix, exported symbol) of every custom call in a build.
_TARGETS = (
    ("_conv_forward", "FpdmConvForward"),
    ("_conv_kernel_gradient", "FpdmConvKernelGradient"),
    ("_winograd_forward", "FpdmWinogradForward"),
    ("_winograd_kernel_gradient", "FpdmWinogradKernelGradient"),
    ("_attention_forward", "FpdmAttentionForward"),
    ("_attention_forward_p", "FpdmAttentionForwardWithProbabilities"),
    ("_attention_backward_queries", "FpdmAttentionBackwardQueries"),
    ("_attention_backward_keys", "FpdmAttentionBackwardKeys"),
    ("_adamw", "FpdmAdamW"),
    ("_layer_norm_forward", "FpdmLayerNormForward"),
    ("_layer_norm_backward", "FpdmLayerNormBackward"),
)


@functools.cache
def _register(path: str | None) -> str | None:
  """Loads the build at ``path`` and registers its custom calls with XLA under
  names of their own (so a test can load both x86 builds); returns the names'
  prefix (``<prefix>_conv_forward`` and so on, ``_TARGETS``), or None."""
  if path is None:
    _log.info("no native custom calls built for this CPU (see setup.py); convolutions and "
              "attention keep XLA's kernels")
    return None
  prefix = "fpdm" + os.path.basename(path).split(".")[0]  # fpdm_native_v4
  try:
    lib = ctypes.CDLL(path)
    for suffix, symbol in _TARGETS:
      jax.ffi.register_ffi_target(prefix + suffix, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (OSError, AttributeError, ValueError) as e:  # a build from another jaxlib, say
    _log.warning("could not load %s (%s); convolutions and attention keep XLA's kernels",
                 path, e)
    return None
  return prefix


def target_prefix() -> str | None:
  """The registered custom-call targets' prefix for this CPU's build, or None.
  Called at every trace of a native call: everything it reads is cached."""
  return _register(library())
