"""Thin convolutions' forward and kernel gradient as native XLA:CPU custom calls.

Convolutions with 3-96 channels on one side (the pose embedding at 64x64 to
256x256, a small UNet) are where XLA:CPU's convolution kernels are furthest
behind PyTorch's oneDNN. Worst is the kernel gradient, which XLA runs as a
convolution contracting over batch and pixels, 2-3x slower than oneDNN
(benchmarks/README.md, finding 20); no ``lax`` rewrite of it was faster in the
step (finding 20 lists the forms tried). The forward, and the stride-1 input
gradient (a forward convolution of the output gradient with the flipped,
transposed kernel), are 1.1-1.9x behind. fpdm_jax/native/ has the loop nests
oneDNN uses for both, registered with XLA through its FFI and run on XLA's own
thread pool (findings 21 and 22; ``python -m benchmarks.kernel_gradient``).

setup.py builds them at install for x86-64-v4 (AVX-512) and x86-64-v3
(AVX2), or plainly on other Linux machines; ``library()`` picks the build this
CPU can run. Without a build (no C++ compiler, not Linux, an older CPU) the
convolution keeps XLA's kernels. ``models.convolution`` decides where each is
used; ``FPDM_CONV_NATIVE_KERNEL_GRADIENT=0`` and ``FPDM_CONV_NATIVE_FORWARD=0``
turn each off alone, to measure it.
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

KERNEL_GRADIENT_OPT_OUT = "FPDM_CONV_NATIVE_KERNEL_GRADIENT"
FORWARD_OPT_OUT = "FPDM_CONV_NATIVE_FORWARD"

# CPU flags (/proc/cpuinfo) each x86 build needs: what GCC's -march levels
# may emit.
_X86_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# (library name under fpdm_jax/, the CPU flags it needs), best first.
_BUILDS = {
    "x86": (("_native_conv_v4", _X86_V4), ("_native_conv_v3", _X86_V3)),
    "other": (("_native_conv", frozenset()),),
}

_log = logging.getLogger(__name__)


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


@functools.cache
def _register(path: str | None) -> str | None:
  """Loads the build at ``path`` and registers its two handlers with XLA under
  names of their own (so a test can load both x86 builds); returns the names'
  prefix (``<prefix>_forward``, ``<prefix>_kernel_gradient``), or None."""
  if path is None:
    _log.info("no native convolutions built for this CPU (see setup.py); convolutions keep "
              "XLA's kernels")
    return None
  prefix = "fpdm" + os.path.basename(path).split(".")[0]  # fpdm_native_conv_v4
  try:
    lib = ctypes.CDLL(path)
    for suffix, symbol in (("_forward", "FpdmConvForward"),
                           ("_kernel_gradient", "FpdmConvKernelGradient")):
      jax.ffi.register_ffi_target(prefix + suffix, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except (OSError, AttributeError, ValueError) as e:  # a build from another jaxlib, say
    _log.warning("could not load %s (%s); convolutions keep XLA's kernels", path, e)
    return None
  return prefix


def target_prefix() -> str | None:
  """The registered custom-call targets' prefix for this CPU's build, or None."""
  return _register(library())


def forward_available() -> bool:
  """Whether the native forward is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(FORWARD_OPT_OUT) and target_prefix() is not None


def kernel_gradient_available() -> bool:
  """Whether the native kernel gradient is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(KERNEL_GRADIENT_OPT_OUT) and target_prefix() is not None


def _check(name, a, b, cout):
  if a.dtype != jnp.float32 or b.dtype != jnp.float32 or cout % 8:
    raise ValueError(f"native conv {name}: float32 and C_out % 8 == 0 only, got "
                     f"{a.dtype}, {b.dtype}, {cout} output channels")


def _attrs(strides, padding) -> dict:
  (top, _), (left, _) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(top), pad_left=np.int64(left))


def forward(x, w, out_size, strides, padding):
  """The NHWC x HWIO float32 convolution of ``x`` [B, H, W, C_in] with ``w``
  [kh, kw, C_in, C_out], ``strides`` and explicit ``padding`` ((top, bottom),
  (left, right)), of output size ``out_size`` (Ho, Wo): bottom and right
  padding need no argument, whatever the output reaches beyond the image is
  zero. C_out must be a multiple of 8. Call only where ``forward_available()``.
  """
  _check("forward", x, w, w.shape[3])
  out = jax.ShapeDtypeStruct((x.shape[0], *out_size, w.shape[3]), jnp.float32)
  call = jax.ffi.ffi_call(target_prefix() + "_forward", out, vmap_method="sequential")
  return call(x, w, **_attrs(strides, padding))


def input_gradient(dy, w, x_shape, padding):
  """d(loss)/d(input) of a stride-1 convolution: the forward convolution of the
  output gradient ``dy`` with the kernel flipped in space and transposed in
  channels, padded kh - 1 - top and kw - 1 - left (top and left must be at
  most kh - 1 and kw - 1), out to the input's size. C_in must be a multiple
  of 8."""
  kh, kw = w.shape[:2]
  (top, _), (left, _) = padding
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  return forward(dy, w_t, x_shape[1:3], (1, 1),
                 ((kh - 1 - top, 0), (kw - 1 - left, 0)))


def kernel_gradient(x, dy, kernel_shape, strides, padding):
  """d(loss)/d(kernel), [kh, kw, C_in, C_out] float32, of an NHWC x HWIO
  float32 convolution with input ``x``, output cotangent ``dy``, ``strides``
  and explicit ``padding`` ((top, bottom), (left, right)).

  Bottom and right padding need no argument: whatever input row or column
  ``dy``'s size reaches beyond the image is zero. C_out must be a multiple of 8.
  Call only where ``kernel_gradient_available()``.
  """
  _check("kernel gradient", x, dy, kernel_shape[3])
  call = jax.ffi.ffi_call(target_prefix() + "_kernel_gradient",
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                          vmap_method="sequential")
  return call(x, dy, **_attrs(strides, padding))
