# capsnet: one-command set-up, build, test, benchmark and train.
#
#   make test     virtual environment + pinned dependencies + build + the whole test suite
#   make bench    CPU benchmark table (fused vs reference vs torch.compile), see README
#   make train    a short CapsNet training run on MNIST (minutes on a CPU), see README
#   make test-cuda-asan   the emulated CUDA tests under AddressSanitizer + UBSan (a few minutes)
#   make cuda-model       the static performance model of the CUDA kernels, and its resource check
#   make gpu-check        on a machine with a GPU: build, CUDA tests, benchmarks, training (README)
#
# Variables: PYTHON (interpreter for the venv), VENV (its folder), REQUIREMENTS,
# DATA_DIR (MNIST in torchvision's layout), TRAIN_ARGS (options for train_mnist.py).

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

DATA_DIR ?= ../shared/data
DRY_RUN ?= 0
# A quick run: 10,000 training images, one epoch. The paper's full run is
#   make train TRAIN_ARGS="--epochs 50"    (a GPU is advisable: ~6.5 min per epoch on 2 CPU cores)
TRAIN_ARGS ?= --limit-train 10000 --batch-size 32 --epochs 1
TRAIN_OUT ?= runs/mnist-$(shell date +%Y%m%d-%H%M%S)

.PHONY: venv install test bench train clean test-cuda-asan cuda-model gpu-check

venv: $(VENV)/.requirements-installed

$(VENV)/.requirements-installed: $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

# --no-build-isolation: compile against the torch in the venv (see setup.py).
install: venv
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	@$(PY) -c "import capsnet._extension as e; print('capsnet._C built with kernels for:', ', '.join(sorted(e.KERNEL_DEVICE_TYPES)) or 'none')"

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks.bench_routing --device cpu

train: install
	$(PY) train_mnist.py --data-dir $(DATA_DIR) --out-dir $(TRAIN_OUT) $(TRAIN_ARGS)

# The emulator is built by the tests themselves (benchmarks/emulator.py): no extension build needed.
test-cuda-asan: venv
	PY=$(PY) scripts/test_cuda_asan.sh

# Needs nvcc (CUDA_HOME) and nvdisasm (the CUDA toolkit's, or the one triton ships with torch).
cuda-model: venv
	$(PY) -m benchmarks.cuda_model --check
	$(PY) -m benchmarks.cuda_model

# No venv and no downloads: the Python that has torch (PYTHON=...), MNIST from DATA_DIR.
gpu-check:
	PYTHON=$(PYTHON) DATA_DIR=$(DATA_DIR) DRY_RUN=$(DRY_RUN) scripts/gpu_check.sh

clean:
	rm -rf build capsnet/*.so *.egg-info
