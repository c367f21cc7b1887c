# The README's two commands: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The tested torch build goes in first, so the range in pyproject.toml is already satisfied
# (on a machine without it, pip falls back to the newest release the range admits).
TORCH  ?= torch==2.13.0

.PHONY: run test test-fast venv install install-dev clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)" || $(BIN)/pip install --quiet "torch>=2.4"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## make run: set up, then run the whole pipeline on params.yaml (SQLite MLflow, local DVC cache)
run: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/lmpipe run

## make test: set up with the dev extra, then run the test suite
test: $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

## make test-fast: the inner loop, every test not marked slow (a few minutes on 2 cores)
test-fast: $(VENV)/.installed-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
