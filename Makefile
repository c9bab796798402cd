# `make run` and `make test` set up .venv by themselves; only Python 3.11+ is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean

run: $(VENV)/installed
	$(BIN)/python orchestrator.py

test: $(VENV)/installed
	$(BIN)/python -m pytest -q -n 2

# Reinstalls only when requirements.txt is newer than the last install.
$(VENV)/installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache __pycache__

bench: $(VENV)/installed
	$(BIN)/python benchmark.py
