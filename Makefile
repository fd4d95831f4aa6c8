# Two entry points for a fresh clone: `make demo` and `make test`. Each installs what it needs
# into .venv first (torch pinned to the CPU build 2.13.0; the project itself supports torch >= 2.6).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
FLOAT8_STAMP := $(VENV)/.installed-float8

.PHONY: install demo test lint fmt bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[test,plots]"
	touch $(STAMP)

$(FLOAT8_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[float8]"
	touch $(FLOAT8_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint $(FLOAT8_STAMP)
	$(BIN)/python -m pytest -q

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q -s

clean:
	rm -rf outputs artifacts
