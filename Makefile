# `make test` and `make demo` create .venv on first use, install pinned deps and the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := $(wildcard setup.py pyproject.toml requirements.txt csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)

.PHONY: test demo install bench check-deps clean

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

# Resolve requirements.txt as a stranger's machine would: the public index only (no pip config,
# no local wheels, no constraints). On Linux that means torch's CUDA build, which pins its own
# triton: a conflicting pin fails here, before it lands. Needs the network; CI runs it.
check-deps:
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= \
	  timeout 600 $(PY) -m pip install --dry-run --ignore-installed -q -r requirements.txt

clean:
	rm -rf build *.egg-info cpl_kernels/_C*.so
