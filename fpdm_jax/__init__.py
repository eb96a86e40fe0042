"""fpdm-jax: FPDM (pose-guided person image synthesis) in JAX/Flax.

Importing the package sets up the host for XLA:CPU before JAX starts: its
flags go into ``XLA_FLAGS`` (``xla_cpu_flags``: faster convolution gradients;
accelerators ignore them), and where JAX can only compute on the CPU, glibc's
malloc keeps the memory a step frees (``host_memory``: no page faults on every
step's temporaries).
"""
from fpdm_jax import host_memory as _host_memory
from fpdm_jax import xla_cpu_flags as _xla_cpu_flags

_xla_cpu_flags.apply()
_host_memory.apply()
