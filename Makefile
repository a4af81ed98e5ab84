# Two entry points: `make demo` (install + the whole product on the built-in dataset) and
# `make test` (install + pytest). Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install test lint test-slow demo real bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: install lint
	$(BIN)/pytest -q

# ruff (lint, import order, pyupgrade; pyproject [tool.ruff]) over everything, mypy over the runtime.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test-slow: install
	$(BIN)/pytest -q -m slow

demo: install
	OUT=$(OUT) PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

# The real-photo model (docs/real-photos.md): Flickr8k and a local sentence encoder.
DATA ?= ../shared/data/flickr8k
TEXT_MODEL ?= $(HOME)/.cache/stbir/all-MiniLM-L6-v2
WEIGHTS ?= ../shared/data/weights/mobilenet_v2_imagenet.pt
real: install
	$(BIN)/python benchmarks/real_photos.py $(DATA) --text-model $(TEXT_MODEL) --weights $(WEIGHTS) --out runs/real8k

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
