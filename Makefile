# Two entry points on a fresh machine; each installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench-quality bench-speed schemas clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Run time needs only the package; tests add attack code (ART) and test tools.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run-installed

run: $(VENV)/.run-installed
	$(BIN)/modelwatch run --demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check detectors streams tests bench

test: $(VENV)/.dev-installed lint
	$(BIN)/python -m pytest -n 2 detectors tests

bench-quality: $(VENV)/.dev-installed
	$(BIN)/python bench/quality/score.py --data bench/quality/data --work bench/out/quality

bench-speed: $(VENV)/.dev-installed
	$(BIN)/python bench/replay_speed.py

schemas: $(VENV)/.run-installed
	$(BIN)/python -m streams.records

clean:
	rm -rf $(VENV) bench/out
