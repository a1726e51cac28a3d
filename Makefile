# `make train` and `make test` work on a fresh clone: both create .venv and install the pinned versions first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test lint gpu-check

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/sequencer train

test: lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# On a machine with an NVIDIA GPU: implementations against cuDNN, AMP training, img/s and memory (BENCHMARKS.md).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --output benchmarks/results/gpu_check
