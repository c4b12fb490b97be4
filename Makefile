# Set-up and checks. `make demo` runs the whole method on the built-in synthetic world;
# `make test` runs the offline test suite. Both create .venv/ on first use. `make test-oldest` runs the
# suite in .venv-oldest/ with every dependency at its lower bound in pyproject.toml (CI runs both).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OLDEST := .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
OLDEST_STAMP := $(OLDEST)/.installed
# The oldest leg's interpreter: the lowest Python requires-python allows, when this machine has one.
OLDEST_PYTHON ?= $(shell .ci/oldest_python)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline

.PHONY: install test install-oldest test-oldest demo demo-quick demo-seeds demo-things rehearsal paper-table-dry-run lint gpu-report clean

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
	$(PY) .ci/oldest_constraints.py --installed
	$(PY) -m pytest -q tests

# The oldest supported versions: the lowest Python requires-python allows (.ci/oldest_python), and pip
# installs with constraints pinning every dependency (core and extras) to its `>=` bound in
# pyproject.toml (.ci/oldest_constraints.py); their own dependencies resolve freely.
$(OLDEST_STAMP): pyproject.toml .ci/oldest_constraints.py
	test "$$($(OLDEST_PY) -V 2>&1)" = "$$($(OLDEST_PYTHON) -V 2>&1)" || { rm -rf $(OLDEST); $(OLDEST_PYTHON) -m venv $(OLDEST); }
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) .ci/oldest_constraints.py > $(OLDEST)/constraints.txt
	$(OLDEST_PY) -m pip install -q -c $(OLDEST)/constraints.txt -e ".[dev]"
	touch $(OLDEST_STAMP)

install-oldest: $(OLDEST_STAMP)

test-oldest: install-oldest
	$(OLDEST_PY) .ci/oldest_constraints.py --installed
	$(OLDEST_PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check code tests benchmarks

demo: install
	$(PY) code/demo.py

demo-quick: install
	$(PY) code/demo.py --quick

# The demo's table with 3 seeds per row (mean +- sd, per-seed figures, pooled interval; docs/trust.md):
# seed 0 reuses `make demo`'s runs, seeds 1-2 go to outputs/demo/seed{1,2}; table in results/demo_seeds3.
demo-seeds: install
	$(PY) code/demo.py --seeds 3

# Every stage at the paper's model sizes, a few steps each, on random-weight stand-ins written in
# the real formats (about 15 GB under pretrains/rehearsal and datasets/rehearsal, written once).
rehearsal: install
	$(PY) code/rehearsal.py

# Stages 2-3 on a synthetic THINGS-EEG2 (zero-shot retrieval); not part of `make demo`.
demo-things: install
	$(PY) code/demo.py --things

paper-table-dry-run: install
	$(PY) code/paper_table.py --dry-run

# Every GPU figure in one run (benchmarks/gpu_report.py; docs/gpu.md): results/gpu_report.json and .md.
# With .venv's python when there is one, else the machine's (a GPU box's own torch). Wheels carried in
# .whl/ (what such a box lacks; how to fetch them: the script's docstring) are installed first, offline.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-report:
	if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target .whl/site .whl/*.whl; fi
	PYTHONPATH="$(CURDIR)/.whl/site$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PY) benchmarks/gpu_report.py

clean:
	rm -rf $(VENV) $(OLDEST) results/demo results/demo_seeds* results/demo_visual* datasets/demo pretrains/demo outputs/demo outputs/demo_visual* results/demo_things datasets/demo_things outputs/demo_things
