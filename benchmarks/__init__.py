"""Benchmarks (run as modules, e.g. ``python -m benchmarks.input_pipeline --help``).

``fpdm_jax`` is imported first so that its XLA:CPU flags are in ``XLA_FLAGS``
and its malloc settings (``fpdm_jax.host_memory``) are in place before any
benchmark touches JAX (the roofline's matmul runs before the model is built):
every table measures what fpdm_jax's users get. The malloc settings are
process-wide, so the torch side of a benchmark runs with them too.
"""
import fpdm_jax  # noqa: F401
