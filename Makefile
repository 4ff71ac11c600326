# Two entry points on a fresh machine; each installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint debian-tools bench-quality bench-speed bench-stream schemas clean

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

# The real Prometheus server (and promtool) and headless Chromium for the tests of the
# dashboards, alert rules and HTML report, openssl for the TLS tests; without root their
# tests skip (never under CI).
debian-tools:
	@if command -v promtool >/dev/null && command -v chromium >/dev/null && \
		command -v openssl >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	else echo "make: no root to install prometheus, chromium, openssl: their tests will skip"; exit 0; fi; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
		prometheus chromium chromium-driver openssl >/dev/null

test: $(VENV)/.dev-installed lint debian-tools
	$(BIN)/python -m pytest -n 2 detectors tests

bench-quality: $(VENV)/.dev-installed
	$(BIN)/python bench/quality/score.py --data bench/quality/data --work bench/out/quality

bench-speed: $(VENV)/.dev-installed
	$(BIN)/python bench/replay_speed.py

bench-stream: $(VENV)/.dev-installed
	$(BIN)/python bench/stream_speed.py

schemas: $(VENV)/.run-installed
	$(BIN)/python -m streams.records

clean:
	rm -rf $(VENV) bench/out
