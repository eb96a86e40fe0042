"""Shared test set-up: CPU JAX with a persistent compilation cache.

The cache lives outside the work tree so repeated runs on the same machine
(and CI right after a session) reuse compiled functions.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.expanduser(os.environ.get("FPDM_JAX_CACHE", "~/.cache/fpdm_jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
