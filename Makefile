# capsnet: one-command set-up, build, test, benchmark and train.
#
#   make test               virtual environment + pinned dependencies + build + the whole test suite
#   make bench              CPU benchmark table (fused vs reference vs torch.compile) and the
#                           large-shape memory measurement, written to benchmarks/results/; see README
#   make bench-pytest       the same cases under pytest-benchmark (save and compare runs)
#   make bench-check        every benchmark run once at small sizes: a check that they work (CI)
#   make dist               sdist and wheel into dist/
#   make package-check      sdist and wheel built, installed into empty folders, smoke-tested
#   make portability-check  the installed wheel run under emulated older x86-64 CPUs (QEMU)
#   make train              a short CapsNet training run on MNIST (minutes on a CPU), see README
#   make test-cuda-asan     the emulated CUDA tests under AddressSanitizer + UBSan (a few minutes)
#   make cuda-model         the static performance model of the CUDA kernels, and its resource check
#   make gpu-check          on a machine with a GPU: build, CUDA tests, benchmarks, training (README)
#
# Variables: PYTHON (interpreter for the venv), VENV (its folder), REQUIREMENTS,
# DATA_DIR (MNIST in torchvision's layout), TRAIN_ARGS (options for train_mnist.py),
# BENCH_ARGS (options for pytest in bench-pytest), PACKAGE_CHECK_DIR (package-check's folder),
# PACKAGE_CHECK_CUDA_ARCH (the one GPU architecture package-check builds for),
# BENCH_CHECK_DIR (where bench-check writes its throwaway results).

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
# Parallel compile jobs for the extension (each nvcc job takes a GB or more): 2 unless set,
# for this project's 2-core CI machines; gpu-check, on a GPU machine, uses every core.
export MAX_JOBS ?= 2

# MNIST in torchvision's layout (DATA_DIR/MNIST/raw): $CAPSNET_DATA_DIR if set, else the
# project's shared copy beside the clone.
DATA_DIR ?= $(or $(CAPSNET_DATA_DIR),../shared/data)
DRY_RUN ?= 0
ONLY ?=
# A quick run: 10,000 training images, one epoch (a few minutes on 2 CPU cores). The
# paper's full run is
#   make train TRAIN_ARGS="--epochs 50"    (a GPU is advisable: ~6.5 min per epoch on 2 CPU cores)
TRAIN_ARGS ?= --limit-train 10000 --batch-size 32 --epochs 1
# A new directory per run: a run never mixes its files with another's.
TRAIN_OUT ?= runs/mnist-$(shell date +%Y%m%d-%H%M%S)

PACKAGE_CHECK_DIR ?= .package-check
BENCH_CHECK_DIR ?= .bench-check
BENCH_ARGS ?=

.PHONY: venv install test bench bench-pytest bench-check dist package-check portability-check train clean \
	test-cuda-asan cuda-model gpu-check

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
	$(PY) -m benchmarks.large_shape_memory

bench-pytest: install
	$(PY) -m pytest benchmarks/ --benchmark-only $(BENCH_ARGS)

# Uses the extension as built (run after make install or make test): no timing, B=1 only.
bench-check: venv
	$(PY) -m pytest benchmarks/ --benchmark-disable -k "B1-" -q -p no:cacheprovider
	$(PY) -m benchmarks.large_shape_memory --batch 2 --small-batches 1 2 --results-dir $(BENCH_CHECK_DIR)
	$(PY) -m benchmarks.cpu_kernel_variants --batch-sizes 1 --rounds 1 --min-run-time 0.01 --no-compile --isa-limit avx2

# --no-isolation, like install: the wheel is compiled against the venv's torch. A stale
# capsnet.egg-info would add the files its SOURCES.txt lists to the sdist: start without it.
dist: venv
	rm -rf dist capsnet.egg-info
	$(PY) -m build --no-isolation --outdir dist .

# The packages are built for one GPU architecture only: the check is about what the sdist
# carries and how it installs, and every architecture would triple its two CUDA builds.
PACKAGE_CHECK_CUDA_ARCH ?= 9.0
package-check: venv
	TORCH_CUDA_ARCH_LIST="$(PACKAGE_CHECK_CUDA_ARCH)" bash .ci/package_check.sh $(PY) $(PACKAGE_CHECK_DIR)

portability-check: venv
	bash .ci/portability_check.sh $(PY) $(PACKAGE_CHECK_DIR)/from-wheel

train: install
	$(PY) train_mnist.py --data-dir $(DATA_DIR) --out-dir $(TRAIN_OUT) $(TRAIN_ARGS)

# The emulator is built by the tests themselves (benchmarks/emulator.py): no extension build needed.
test-cuda-asan: venv
	PY=$(PY) scripts/test_cuda_asan.sh

# Needs nvcc (CUDA_HOME) and nvdisasm (the CUDA toolkit's, or the one triton ships with torch).
cuda-model: venv
	$(PY) -m benchmarks.cuda_model --check
	$(PY) -m benchmarks.cuda_model --check --arch sm_80
	$(PY) -m benchmarks.cuda_model --check --dtype float64
	$(PY) -m benchmarks.cuda_model --check --dtype float16
	CAPSNET_CUDA_PLAN=staging_slots=0,sweep_staging_slots=0,gradient_rows=8 $(PY) -m benchmarks.cuda_model --check
	CAPSNET_CUDA_PLAN=sweep_staging_slots=0,gradient_loads_ahead=0 $(PY) -m benchmarks.cuda_model --check --arch sm_80
	$(PY) -m benchmarks.cuda_model --lines kLater

# No venv and no downloads: the Python that has torch (PYTHON=...), MNIST from DATA_DIR.
gpu-check:
	MAX_JOBS=$(if $(filter file,$(origin MAX_JOBS)),$$(nproc),$(MAX_JOBS)) \
	  PYTHON=$(PYTHON) DATA_DIR=$(DATA_DIR) DRY_RUN=$(DRY_RUN) ONLY="$(ONLY)" scripts/gpu_check.sh

clean:
	rm -rf build dist $(PACKAGE_CHECK_DIR) $(BENCH_CHECK_DIR) capsnet/*.so *.egg-info
