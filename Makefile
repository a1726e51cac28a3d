# `make train` and `make test` work on a fresh clone: both create .venv and install the pinned versions first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The oldest supported versions (requirements-oldest.txt) on the oldest Python that has them all.
OLDEST ?= .venv-oldest
OLDEST_STAMP := $(OLDEST)/.installed
OLDEST_PYTHON ?= $(shell for p in python3.10 $(HOME)/.pyenv/versions/3.10*/bin/python3.10 python3; do \
	$$p -c 'import venv' 2>/dev/null && { echo $$p; break; }; done)
# gpu-check installs nothing: any Python that already has torch, torchvision and timm (a GPU machine's own).
PYTHON ?= python3

.PHONY: install train test lint test-oldest gpu-check gpu-check-full

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/sequencer train

# One pytest-xdist worker per core, each with its share of the cores (tests/conftest.py).
test: lint
	$(PY) -m pytest -q -n auto

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# One resolve of the oldest set together with the package: it fails if pyproject's ranges leave that set out.
$(OLDEST_STAMP): requirements-oldest.txt pyproject.toml
	test -x $(OLDEST)/bin/python || $(OLDEST_PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet -r requirements-oldest.txt -e .
	touch $(OLDEST_STAMP)

# The suite without the slow end-to-end runs, on the oldest supported versions.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python --version
	$(OLDEST)/bin/python -m pytest -q -n auto -m "not slow"

# On a machine with an NVIDIA GPU: implementations against float64, AMP training, img/s and memory (BENCHMARKS.md).
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py --output benchmarks/results/gpu_check

gpu-check-full:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py --mode full --output benchmarks/results/gpu_check_full
