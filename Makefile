# `make test` and `make demo` create .venv on first use, install pinned deps and the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := $(wildcard setup.py pyproject.toml requirements.txt csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

.PHONY: test demo install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/cpl inject --demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf build *.egg-info cpl_kernels/_C*.so
