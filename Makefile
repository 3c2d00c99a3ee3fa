# Set-up and entry points. Every target creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Three workers on two cores: most of the suite waits on servers, TP ranks and transfers in other
# processes. Whole files per worker (loadfile), so module-scoped servers start once.
PYTEST_XDIST ?= -n 3 --dist loadfile

# `make gpu-check` runs on a GPU machine without a package index: no venv, the image's Python
# (GPU_PYTHON) plus the wheels `make gpu-wheels` fetched into .whl (carried along).
GPU_PYTHON ?= python3
OUT ?= gpu-check-out
GPU_CHECK_ARGS ?=

.PHONY: install test test-slow demo clean gpu-check gpu-wheels

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so nothing below pulls a multi-GB CUDA build where a CPU build is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# `make test` leaves out the tests marked slow (the long soak, the Triton interpreter run, the
# six-layer transfer bench, the HF parity stage, the TP 2 accuracy script); `make test-slow` runs
# just those, and `.ci/run` runs both, so CI loses no coverage.
test: install
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q $(PYTEST_XDIST) -m slow $(PYTEST_ARGS) tests

demo: install
	$(PY) -m kvxfer.entrypoints.demo

gpu-check:
	$(GPU_PYTHON) -m kvxfer.bench.gpu_check --out "$(OUT)" $(GPU_CHECK_ARGS)

gpu-wheels:
	bash scripts/gpu-wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info
