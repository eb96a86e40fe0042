"""fpdm-jax: FPDM (pose-guided person image synthesis) in JAX/Flax.

Importing the package adds fpdm-jax's XLA:CPU settings to ``XLA_FLAGS`` before
JAX creates a backend (see ``xla_cpu_flags``: faster convolution gradients on
CPU; accelerators ignore them).
"""
from fpdm_jax import xla_cpu_flags as _xla_cpu_flags

_xla_cpu_flags.apply()
