"""A thin convolution's kernel gradient as a native XLA:CPU custom call.

d(loss)/d(kernel) of a convolution with 3-96 channels on one side is where
XLA:CPU is furthest behind PyTorch's oneDNN: XLA runs it as a convolution
that contracts over batch and pixels, 2-3x slower than oneDNN at the pose
embedding's and a small UNet's shapes (benchmarks/README.md, finding 20), and
no ``lax`` rewrite of the sum was faster (finding 20 lists the forms tried).
``fpdm_jax/native/conv_kernel_gradient.cc`` is the loop nest oneDNN uses,
registered with XLA through its FFI and run on XLA's own thread pool. On
those shapes it is 2-4x faster than XLA's kernel and a little faster than
oneDNN (``python -m benchmarks.kernel_gradient``; finding 21).

setup.py builds it at install for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2),
or plainly on other Linux machines; ``library()`` picks the build this CPU
can run. Without a build (no C++ compiler, not Linux, an older CPU) the
convolution keeps its ``lax`` gradients. ``models.convolution`` decides where
it is used; ``FPDM_CONV_NATIVE_KERNEL_GRADIENT=0`` turns it off alone, to
measure it.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from fpdm_jax import xla_cpu_flags

ENV_OPT_OUT = "FPDM_CONV_NATIVE_KERNEL_GRADIENT"

# CPU flags (/proc/cpuinfo) each x86 build needs: what GCC's -march levels
# may emit.
_X86_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# (library name under fpdm_jax/, the CPU flags it needs), best first.
_BUILDS = {
    "x86": (("_conv_kernel_gradient_v4", _X86_V4), ("_conv_kernel_gradient_v3", _X86_V3)),
    "other": (("_conv_kernel_gradient", frozenset()),),
}

_log = logging.getLogger(__name__)


def _cpu_flags() -> frozenset[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def library() -> str | None:
  """Path of the best build of the custom call this CPU can run, or None."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  x86 = platform.machine().lower() in ("x86_64", "amd64")
  flags = _cpu_flags() if x86 else frozenset()
  for name, needs in _BUILDS["x86" if x86 else "other"]:
    if not needs <= flags:
      continue
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
      path = os.path.join(here, name + suffix)
      if os.path.isfile(path):
        return path
  return None


@functools.cache
def _register(path: str | None) -> str | None:
  """Loads the build at ``path`` and registers it with XLA under a name of its
  own (so a test can load both x86 builds); returns the name, or None."""
  if path is None:
    _log.info("no native conv kernel gradient built for this CPU (see setup.py); "
              "convolutions keep their lax gradients")
    return None
  name = "fpdm" + os.path.basename(path).split(".")[0]  # fpdm_conv_kernel_gradient_v4
  try:
    handler = ctypes.CDLL(path).FpdmConvKernelGradient
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
  except (OSError, AttributeError, ValueError) as e:  # a build from another jaxlib, say
    _log.warning("could not load %s (%s); convolutions keep their lax gradients", path, e)
    return None
  return name


def target() -> str | None:
  """The registered custom-call target of this CPU's build, or None."""
  return _register(library())


def available() -> bool:
  """Whether the custom call is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(ENV_OPT_OUT) and target() is not None


def kernel_gradient(x, dy, kernel_shape, strides, padding):
  """d(loss)/d(kernel), [kh, kw, C_in, C_out] float32, of an NHWC x HWIO
  float32 convolution with input ``x``, output cotangent ``dy``, ``strides``
  and explicit ``padding`` ((top, bottom), (left, right)).

  Bottom and right padding need no argument: whatever input row or column
  ``dy``'s size reaches beyond the image is zero. C_out must be a multiple of 8.
  Call only where ``available()``.
  """
  kh, kw, cin, cout = kernel_shape
  if x.dtype != jnp.float32 or dy.dtype != jnp.float32 or cout % 8:
    raise ValueError(f"native kernel gradient: float32 and C_out % 8 == 0 only, got x "
                     f"{x.dtype}, dy {dy.dtype}, kernel {tuple(kernel_shape)}")
  (top, _), (left, _) = padding
  call = jax.ffi.ffi_call(target(), jax.ShapeDtypeStruct((kh, kw, cin, cout), jnp.float32),
                          vmap_method="sequential")
  return call(x, dy, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(top), pad_left=np.int64(left))
