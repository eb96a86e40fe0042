# fpdm-jax: `make demo` runs the whole system on the embedded synthetic data;
# `make test` runs the test suite. Both install into .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: install test demo clean

install: $(STAMP)

# Re-installs whenever pyproject.toml or a native source changes (setup.py
# builds fpdm_jax/native/*; it says what each is for).
# torch is pinned (2.13.0, CPU) in the test extra so pip never pulls a CUDA build.
$(STAMP): pyproject.toml setup.py $(wildcard fpdm_jax/native/*.c fpdm_jax/native/*.cc fpdm_jax/native/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m fpdm_jax.demo --workdir $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
