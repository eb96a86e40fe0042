"""What the tests of fpdm_jax/native/ share: skip them where no build can be
there, fail them where one should be and is not, and run them as in a
one-device process (the suite simulates 8 CPU devices; the native calls are
used only with one)."""
from __future__ import annotations

import shutil
import sys

import pytest

from fpdm_jax.models import dense, native


def require_library() -> None:
  """At a test module's import: skip it without a build, unless this machine
  could have built one (Linux and g++), which is then an install to fix."""
  if native.library() is not None:
    return
  if sys.platform.startswith("linux") and shutil.which("g++"):
    pytest.fail("no fpdm_jax/_native*.so for this CPU although g++ is installed: "
                "re-run `pip install -e .` (or `make install`) and read its build output",
                pytrace=False)
  pytest.skip("the native custom calls are built only on Linux with a C++ compiler",
              allow_module_level=True)


@pytest.fixture(autouse=True)
def one_cpu_device(monkeypatch):
  """Autouse in every test module that binds it at module level
  (``one_cpu_device = native_fixture.one_cpu_device``)."""
  monkeypatch.setattr(dense, "single_cpu_device", lambda: True)
