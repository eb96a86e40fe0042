"""Benchmarks (run as modules, e.g. ``python -m benchmarks.input_pipeline --help``).

``fpdm_jax`` is imported first so that its XLA:CPU flags are in ``XLA_FLAGS``
before any benchmark touches JAX (the roofline's matmul runs before the model
is built): every table measures what fpdm_jax's users get.
"""
import fpdm_jax  # noqa: F401
