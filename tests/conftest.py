"""Shared test set-up: CPU JAX with a persistent compilation cache.

The cache lives outside the work tree so repeated runs on the same machine
(and CI right after a session) reuse compiled functions.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight simulated devices, so sharded code is exercised on one CPU.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import fpdm_jax  # noqa: E402,F401  (adds its XLA:CPU flags before JAX starts)
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.path.expanduser(os.environ.get("FPDM_JAX_CACHE", "~/.cache/fpdm_jax/xla")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
  """A small synthetic dataset built once per test session: (data_dir, name)."""
  from data_prep import build
  out = tmp_path_factory.mktemp("synthetic_data")
  assert build.main(["synthetic", "--data-dir", str(out), "--num-train", "32",
                     "--num-test", "8", "--workers", "1", "--seed", "0"]) == 0
  return str(out), "synthetic_people/64x64_train32_test8_seed0"
