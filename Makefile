# The two commands of the README: `make run` (main job on the embedded default) and `make test`.
# Both create .venv/ from requirements.lock (exact pins) when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
# no network is the normal case here: telemetry and hub look-ups off by default
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-gpu run run-av test test-slow test-all flow bench clean

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(VENV)/.installed

# GPU FAISS replaces the CPU build (both provide the `faiss` module, never install both)
install-gpu: install
	$(BIN)/pip uninstall -y -q faiss-cpu
	$(BIN)/pip install -q --disable-pip-version-check "faiss-gpu==1.15.1"

# `cmr check` first: dvc repro deletes a stage's old output before the stage can find a bad setting
run: install
	$(BIN)/cmr check
	PATH=$(BIN):$$PATH dvc repro
	$(BIN)/cmr metrics

# video <-> audio on the embedded sample (data/raw/av_sample): the cross-modal mixer MAE + retriever
run-av: install
	$(BIN)/cmr --params params/av.yaml pipeline
	$(BIN)/cmr --params params/av.yaml metrics

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

flow: install
	$(BIN)/python flows/pipeline.py

bench: install
	$(BIN)/python benchmarks/bench_index.py
	$(BIN)/python benchmarks/bench_sinkhorn.py
	$(BIN)/python benchmarks/bench_encode.py
	$(BIN)/python benchmarks/bench_cmmixer.py
	@if $(BIN)/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(BIN)/python benchmarks/bench_gpu.py; else echo 'bench_gpu.py skipped: no CUDA device'; fi
