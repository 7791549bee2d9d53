# Two commands on a fresh machine: `make test` and `make bench`.
# torch is pinned: any other spec pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test bench install-test install-bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

install-test: $(VENV)/.torch
	$(PIP) install -q "$(TORCH_SPEC)" -e ".[test,transformers,triton]" build

install-bench: $(VENV)/.torch
	$(PIP) install -q "$(TORCH_SPEC)" -e ".[bench]"

test: install-test
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: install-bench
	$(PY) -m layerpass bench

clean:
	rm -rf $(VENV) build dist *.egg-info bench-results
