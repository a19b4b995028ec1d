# Two entry points: `make quickstart` (set up + run the default job) and `make test` (set up + tests).
# Both are idempotent. torch==2.13.0 is installed first: it is the CPU build on this machine kind, and
# installing it before the project stops pip from pulling a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test quickstart clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[train,cpu,dev,serve]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

quickstart: setup
	$(VENV)/bin/mpt-edge quickstart

clean:
	rm -rf $(VENV)
