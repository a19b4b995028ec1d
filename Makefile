# Two entry points: `make quickstart` (set up + run the default job) and `make test` (set up + tests).
# Both are idempotent. torch==2.13.0 is installed first: it is the CPU build on this machine kind, and
# installing it before the project stops pip from pulling a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-lean quickstart clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,cpu,dev,serve]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The lean runtime alone (runtime/pyproject.toml: `mpt-edge-runtime`, no torch, no CLI) in a fresh venv without a
# pip of its own, installed without bytecode as on a device; its site-packages is checked against LEAN_MAX_MB,
# then the runtime's torch-free tests run against that install only (--noconftest: tests/conftest.py imports
# torch; -c /dev/null: no pytest-timeout there). Rebuilt from scratch each time; ~1 min with a warm pip cache.
LEAN ?= build/venv-lean
LEAN_MAX_MB ?= 180
LEAN_PIP ?= python3 -m pip
LEAN_TESTS := tests/test_lean_runtime.py tests/test_runtime_import.py tests/test_format_fixtures.py \
	tests/test_sampling_params.py

test-lean:
	rm -rf $(LEAN) runtime/build
	python3 -m venv --without-pip $(LEAN)
	$(LEAN_PIP) --python $(LEAN)/bin/python install -q --no-compile "./runtime[cpu]"
	@size=$$(du -sm $(LEAN)/lib/python*/site-packages | cut -f1); \
	echo "lean runtime: $$size MB in site-packages (budget $(LEAN_MAX_MB) MB):" \
	    $$($(LEAN_PIP) --python $(LEAN)/bin/python list --format=freeze | tr '\n' ' '); \
	test "$$size" -le $(LEAN_MAX_MB) || { echo "the lean runtime is over its $(LEAN_MAX_MB) MB budget"; exit 1; }
	$(LEAN_PIP) --python $(LEAN)/bin/python install -q --no-compile "pytest>=8"
	cd $(LEAN) && PYTHONDONTWRITEBYTECODE=1 MPT_EDGE_LEAN=1 bin/python -m pytest -q -p no:cacheprovider \
	    --noconftest -c /dev/null --rootdir $(CURDIR)/tests $(addprefix $(CURDIR)/,$(LEAN_TESTS))

quickstart: setup
	$(VENV)/bin/mpt-edge quickstart

clean:
	rm -rf $(VENV)
