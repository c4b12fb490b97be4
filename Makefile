# Set-up and checks. `make demo` runs the whole method on the built-in synthetic world;
# `make test` runs the offline test suite. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline

.PHONY: install test demo demo-quick lint clean

install: $(STAMP)

# Reinstall only when the package metadata changes: a second `make install` is a no-op.
# torch and torchvision are resolved together from the registry (never the local CPU-only torch
# wheel alone, which has no matching torchvision).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check code tests benchmarks

demo: install
	$(PY) code/demo.py

demo-quick: install
	$(PY) code/demo.py --quick

clean:
	rm -rf $(VENV) results/demo datasets/demo pretrains/demo
