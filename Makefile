# One entry point for a fresh clone: `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.extension-built
SOURCES := $(shell find csrc cmake -type f) CMakeLists.txt pyproject.toml

.PHONY: setup build test test-fast demo bench clean

setup: $(DEPS_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PIP) install -r requirements.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest

test-fast: build
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m "not slow"

demo: build
	HF_HUB_OFFLINE=1 $(VENV)/bin/bayesdiff demo

bench: build
	$(PY) python/bench_recurrence.py

clean:
	rm -rf build $(BUILD_STAMP) bayesdiff_ext/*.so
