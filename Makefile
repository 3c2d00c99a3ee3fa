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

# `make test-vllm`: vLLM's own environment (scripts/vllm-venv.sh; vLLM is never in .venv).
VLLM_VENV ?= .vllm-venv
# scripts/vllm-venv.sh's exit status when the package index is unreachable (its only skip).
VLLM_UNREACHABLE := 75

.PHONY: install test test-slow test-vllm demo clean gpu-check gpu-wheels

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so nothing below pulls a multi-GB CUDA build where a CPU build is present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# `make test` leaves out the tests marked slow (the long soak, the Triton interpreter run, the
# six-layer transfer bench, the HF parity stage, the TP 2 accuracy script, the prefill-death
# failover); `make test-slow` runs
# just those, and `.ci/run` runs both, so CI loses no coverage. The tests marked vllm (real vLLM
# servers, from their own environment) run in neither: `make test-vllm` runs them (also in .ci/run).
test: install
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "not slow and not vllm" $(PYTEST_ARGS) tests

test-slow: install
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "slow and not vllm" $(PYTEST_ARGS) tests

# Makes (or finds ready) the vLLM environment, then runs the vLLM tests with it, one file after
# another (each module starts its own vLLM servers, tens of seconds each on this CPU). Skipped,
# with the reason printed, only when scripts/vllm-venv.sh finds the package index unreachable.
test-vllm: install
	@rc=0; bash scripts/vllm-venv.sh "$(VLLM_VENV)" || rc=$$?; \
	if [ $$rc -eq $(VLLM_UNREACHABLE) ]; then \
	  echo "test-vllm: SKIPPED: the package index is unreachable, so no vLLM environment (scripts/vllm-venv.sh)"; \
	  exit 0; \
	fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	KVXFER_VLLM_PYTHON="$(abspath $(VLLM_VENV))/bin/python" $(PY) -m pytest -q -m vllm $(PYTEST_ARGS) tests/vllm

demo: install
	$(PY) -m kvxfer.entrypoints.demo

gpu-check:
	$(GPU_PYTHON) -m kvxfer.bench.gpu_check --out "$(OUT)" $(GPU_CHECK_ARGS)

gpu-wheels:
	bash scripts/gpu-wheels.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
