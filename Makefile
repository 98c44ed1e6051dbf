# capsnet: one-command set-up, build, test, benchmark and train.
#
#   make test     virtual environment + pinned dependencies + build + the whole test suite
#   make bench    CPU benchmark table (fused vs reference vs torch.compile), see README
#
# Variables: PYTHON (interpreter for the venv), VENV (its folder), REQUIREMENTS.

PYTHON ?= python3
VENV ?= .venv
REQUIREMENTS ?= requirements-dev.txt
PY := $(VENV)/bin/python

# torch's build helper guesses CUDA_HOME from `which nvcc`, which a wrapper script in
# /usr/local/bin turns into /usr/local (no CUDA headers there): point it at the toolkit.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif
export MAX_JOBS ?= 2

.PHONY: venv install test bench clean

venv: $(VENV)/.requirements-installed

$(VENV)/.requirements-installed: $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

# --no-build-isolation: compile against the torch in the venv (see setup.py).
install: venv
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks.bench_routing --device cpu

clean:
	rm -rf build capsnet/*.so *.egg-info
