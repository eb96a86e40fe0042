"""XLA:CPU settings that fpdm-jax adds to ``XLA_FLAGS`` before JAX starts.

Why: jaxlib 0.10's XLA:CPU hands every convolution to YNNPACK, which writes it
as a stencil copy plus a matmul. That suits the forward convolution, but the
kernel gradient of a convolution is also a convolution, and its window is the
whole activation. On 2 AMD EPYC cores YNNPACK ran those at 5-11 GFLOP/s: the
3x3 kernel gradient of the pose embedding at 64x64, 96 -> 96 channels, batch
8 took 498 ms of a 7.3 s medium-UNet train step. With YNNPACK switched off for
convolutions only, XLA runs them through its own (Eigen) kernels, and the
whole step took 5.0 s (benchmarks/README.md, finding 11). Matmuls stay with
YNNPACK, which was as fast or faster.

A one-device CPU process also gets copy insertion's region analysis
(``ONE_DEVICE_DEFAULTS``). Without it XLA:CPU copies every donated Adam moment
before the step overwrites it (1033 copies in the medium UNet step; about 5 %
of the medium batch-1 step); with it there are none, and the losses are the
same to the last bit. Not with several simulated host devices (tests only): an
8-device sharded step compiled with it into JAX's persistent compilation cache
aborted the next process that loaded it (jaxlib 0.10.2, as ``dense``'s
one-device rules did).

Only XLA:CPU reads these flags; GPU and TPU compiles ignore them, so this
changes nothing on accelerators. ``XLA_FLAGS`` is read once, when JAX creates
its first backend, which is why ``fpdm_jax/__init__.py`` applies this at
import. Set the flag yourself in ``XLA_FLAGS`` to override it, or
``FPDM_XLA_CPU_DEFAULTS=0`` to add nothing.
"""
from __future__ import annotations

import logging
import os
import re

ENV_OPT_OUT = "FPDM_XLA_CPU_DEFAULTS"

# flag name -> value. Each must exist in every jaxlib that pyproject allows:
# XLA aborts the process on an unknown flag in XLA_FLAGS.
DEFAULTS = {
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}
# Added only when XLA_FLAGS does not force more than one host device.
ONE_DEVICE_DEFAULTS = {
    "xla_cpu_copy_insertion_use_region_analysis": "true",
}
ALL_DEFAULTS = {**DEFAULTS, **ONE_DEVICE_DEFAULTS}
# The jaxlib releases these flags were checked against (pyproject: jax >=0.10.2,<0.11).
TESTED_JAXLIB = (0, 10)


def _forced_host_devices(xla_flags: str) -> int:
  found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", xla_flags)
  return int(found[-1]) if found else 1


def defaults_for(xla_flags: str) -> dict[str, str]:
  """The defaults that suit a process started with ``xla_flags``."""
  return dict(DEFAULTS if _forced_host_devices(xla_flags) > 1 else ALL_DEFAULTS)


def with_defaults(xla_flags: str, defaults: dict[str, str] | None = None) -> str:
  """``xla_flags`` plus every default flag it does not already set
  (``defaults`` defaults to ``defaults_for(xla_flags)``)."""
  if defaults is None:
    defaults = defaults_for(xla_flags)
  present = {token.lstrip("-").split("=", 1)[0] for token in xla_flags.split()}
  extra = [f"--{name}={value}" for name, value in defaults.items() if name not in present]
  return " ".join([xla_flags.strip(), *extra]).strip()


def opted_out(name: str) -> bool:
  """Whether environment variable ``name`` switches one of fpdm_jax's CPU
  defaults off (0/false/no/off); unset, empty or 1/true/yes/on leave it on.
  Shared by ``FPDM_XLA_CPU_DEFAULTS`` and ``FPDM_CONV_CPU_GRADIENTS``, so both
  read the same words."""
  value = os.environ.get(name, "").strip().lower()
  if value in ("0", "false", "no", "off"):
    return True
  if value in ("", "1", "true", "yes", "on"):
    return False
  raise ValueError(f"{name}={os.environ[name]!r}: use 0 to switch this fpdm_jax CPU default "
                   "off, or unset it (1) to keep it on")


def without_defaults(xla_flags: str, defaults: dict[str, str] | None = None) -> str:
  """``xla_flags`` with every flag named in ``defaults`` (all of ours by
  default) removed: what a child process needs to measure XLA's own defaults
  after this process applied ours."""
  if defaults is None:
    defaults = ALL_DEFAULTS
  return " ".join(token for token in xla_flags.split()
                  if token.lstrip("-").split("=", 1)[0] not in defaults)


def _jaxlib_version() -> tuple[int, ...] | None:
  try:
    from importlib import metadata
    return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
  except Exception:  # not installed, or a version string we can't read
    return None


def apply() -> bool:
  """Add the defaults to ``os.environ['XLA_FLAGS']``; True if anything changed.

  Does nothing when opted out, when the installed jaxlib is not one the flags
  were checked against (an unknown flag would abort the process), or when JAX
  already created its backends (the flags would no longer be read; a warning
  says so).
  """
  if opted_out(ENV_OPT_OUT):
    return False
  version = _jaxlib_version()
  if version is None or version[:2] != TESTED_JAXLIB:
    return False
  current = os.environ.get("XLA_FLAGS", "")
  wanted = with_defaults(current)
  if wanted == current.strip():
    return False
  if _backends_initialized():
    logging.getLogger(__name__).warning(
        "JAX started before fpdm_jax was imported, so XLA_FLAGS can no longer add %s; "
        "convolution gradients on CPU run slower. Import fpdm_jax first, or put the "
        "flag in XLA_FLAGS yourself.", " ".join(wanted.split()[len(current.split()):]))
    return False
  os.environ["XLA_FLAGS"] = wanted
  return True


def _backends_initialized() -> bool:
  import sys
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except Exception:  # private API moved: assume not started
    return False
