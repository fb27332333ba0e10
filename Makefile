# Two entry points: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mmcbn-installed
# mmcv 2.1.0 has no wheels on PyPI: it compiles its ops. These flags replace Python's debug
# flags (faster build) and keep -O3 (the ops run ~3x slower without it).
MMCV_BUILD_ENV := MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 CFLAGS="-DNDEBUG -fwrapv -O3 -Wall"
PYTEST_ARGS ?=

.PHONY: install test demo compat clean

install: $(STAMP)

# constraints.txt pins every package version the test suite passed with
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt torch
	$(BIN)/pip install -c constraints.txt setuptools wheel ninja
	$(MMCV_BUILD_ENV) $(BIN)/pip install -c constraints.txt --no-build-isolation -e ".[tests]"
	touch $(STAMP)

# two test processes on the two cores (the end-to-end tool tests are single-threaded
# subprocesses); the ten slowest tests are listed so that creep shows
test: install
	TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 \
		--durations=10 $(PYTEST_ARGS) tests

demo: install
	TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 $(BIN)/python tools/demo.py

# the oldest supported torch (2.1) in a side environment: tools/compat_check.sh
compat:
	bash tools/compat_check.sh

clean:
	rm -rf build *.egg-info work_dirs data/demo_shapes
