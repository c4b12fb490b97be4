# Set-up and checks. `make demo` runs the whole method on the built-in synthetic world;
# `make test` runs the offline test suite. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline

.PHONY: install test demo demo-quick demo-things rehearsal paper-table-dry-run lint clean

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

# Every stage at the paper's model sizes, a few steps each, on random-weight stand-ins written in
# the real formats (about 15 GB under pretrains/rehearsal and datasets/rehearsal, written once).
rehearsal: install
	$(PY) code/rehearsal.py

# Stages 2-3 on a synthetic THINGS-EEG2 (zero-shot retrieval); not part of `make demo`.
demo-things: install
	$(PY) code/demo.py --things

paper-table-dry-run: install
	$(PY) code/paper_table.py --dry-run

clean:
	rm -rf $(VENV) results/demo datasets/demo pretrains/demo outputs/demo results/demo_things datasets/demo_things outputs/demo_things
