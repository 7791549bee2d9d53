# Two commands on a fresh machine: `make test` and `make bench`.
# torch is pinned: any other spec pulls gigabytes of CUDA packages. Everything else installs at the
# versions in constraints.txt (reproducible); `make test-newest` runs the fast suite on the newest
# releases instead, in its own venv, so drift shows before users see it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NEWEST := .venv-newest
TORCH_SPEC := torch==2.13.0
CONSTRAINTS := -c constraints.txt
PYTEST_ARGS ?=

.PHONY: test test-sweep bench test-newest test-torch install-test install-bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

install-test: $(VENV)/.torch
	$(PIP) install -q $(CONSTRAINTS) "$(TORCH_SPEC)" -e ".[test,transformers,triton,fleet]" build

install-bench: $(VENV)/.torch
	$(PIP) install -q $(CONSTRAINTS) "$(TORCH_SPEC)" -e ".[bench,fleet]"

test: install-test
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# every Hugging Face *ForCausalLM family through layerpass.compile (CI runs a fixed sample; this is ~1 h on 2 cores)
test-sweep: install-test
	LAYERPASS_TEST_SWEEP=all $(PY) -m pytest -q -n 2 -m slow tests/models/hf/test_family_sweep.py

bench: install-bench
	$(PY) -m layerpass bench
	$(PY) -m layerpass step-time --models llama --layers 16

$(NEWEST)/bin/python:
	$(PYTHON) -m venv $(NEWEST)

# no constraints.txt; --upgrade-strategy eager: every dependency at its newest release (torch stays pinned)
test-newest: | $(NEWEST)/bin/python
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(NEWEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager "$(TORCH_SPEC)" \
		-e ".[test,transformers,triton,fleet]" build
	$(NEWEST)/bin/python -m pytest -q -n 2 $(PYTEST_ARGS)

# `make test-torch TORCH=2.14.1`: the fast suite on another supported torch (2.11 to 2.14), in its
# own venv, with everything else at constraints.txt's versions except what each torch release pins
# itself: the triton it was built with (2.14: triton~=3.8, 2.11: ==3.6) and setuptools (2.11: <82;
# the package build needs >=77, so that floor is asked for instead).
TORCH ?= 2.14.1
TORCH_VENV ?= .venv-torch-$(TORCH)

$(TORCH_VENV)/bin/python:
	$(PYTHON) -m venv $(TORCH_VENV)

test-torch: | $(TORCH_VENV)/bin/python
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	grep -Ev '^(triton|setuptools)==' constraints.txt > $(TORCH_VENV)/constraints.txt
	$(TORCH_VENV)/bin/python -m pip install -q -c $(TORCH_VENV)/constraints.txt "torch==$(TORCH)" \
		"setuptools>=77" -e ".[test,transformers,triton,fleet]" build
	$(TORCH_VENV)/bin/python -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(NEWEST) .venv-torch-* build dist *.egg-info bench-results
