# The README's commands. Each does its own set-up from a fresh clone.
#   make demo   build (CUDA kernels only where a GPU is present, or ATTNKIT_DEMO_CUDA=1),
#               then check every op against the float64 reference and run a quick benchmark
#   make test   build everything (CUDA sources too whenever nvcc is present), then ctest
#               and pytest. CI (.ci/run) runs exactly this command with these defaults.
#   make bench  build, then python -m attnkit.bench
#   make kernel-report  build, then tools/kernel_report.py: registers, spills and SASS
#               instruction mix of every CUDA kernel (fails on spills in a hot kernel)
# Python: .venv if present; else the current python3 when it already has torch (as on an
# offline GPU machine); else a new .venv with the pinned packages.
# CUDA archs (ATTNKIT_CUDA_ARCHS, ";"-separated): by default every supported arch ("80;90a")
# where a GPU is present, and one ("90a") where none is: the sources still all compile (so
# compile errors and the kernel report are caught), in about half the time.
SHELL := /bin/bash
PY := $(shell if [ -x .venv/bin/python ]; then echo .venv/bin/python; \
	elif python3 -c 'import torch' >/dev/null 2>&1; then echo python3; else echo .venv/bin/python; fi)
PIN_TORCH ?= torch==2.14.1
# Optional dependencies the tests exercise (drop-in integrations), pinned; attnkit itself
# imports them lazily and does not need them.
TEST_PACKAGES := transformers==5.22.2
PIN_NATTEN := natten==0.21.7
PACKAGES := $(PIN_TORCH) ninja==1.13.2 nvidia-cutlass==4.2.0.0 pytest==9.2.0 numpy==2.4.6 expecttest==0.3.0 \
	setuptools==84.2.1 wheel==0.48.0 $(TEST_PACKAGES)
# Where neither a GPU nor nvcc is present, the CPU build of the same torch (~0.2 GB instead of
# ~5.7 GB with its CUDA libraries), from PyTorch's CPU index; PyPI's wheel when that is unreachable.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
HAS_NVCC := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)
ATTNKIT_CUDA_ARCHS ?= $(if $(filter 1,$(HAS_GPU)),80;90a,90a)
export ATTNKIT_CUDA_ARCHS
export PYTHONPATH := $(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: env build build-cpu test test-cpp test-py demo bench kernel-report clean

env: $(if $(filter .venv/bin/python,$(PY)),.venv/.ready)

.venv/.ready:
	python3 -m venv .venv
	@if [ "$(HAS_GPU)$(HAS_NVCC)" = 00 ]; then \
	  echo "attnkit: no GPU and no nvcc: the CPU build of $(PIN_TORCH) from $(TORCH_CPU_INDEX)"; \
	  .venv/bin/pip install -q --timeout 20 --retries 1 --extra-index-url $(TORCH_CPU_INDEX) "$(PIN_TORCH)+cpu" || \
	  echo "attnkit: $(TORCH_CPU_INDEX) unreachable: PyPI's $(PIN_TORCH) instead (a CUDA build, ~5.7 GB)"; \
	fi
	.venv/bin/pip install -q $(PACKAGES)
	@# NATTEN (tests of attnkit.compat.natten compare against it): its pure-Python build (no
	@# libnatten: no GPU visible, NATTEN_CUDA_ARCH unset), against the torch above.
	CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= .venv/bin/pip install -q --no-build-isolation --no-deps $(PIN_NATTEN)
	touch $@

# Full build: CUDA sources whenever torch has CUDA and nvcc is found.
# tools/build.py prints one short line per compiled source (ninja's own lines are ~1,000
# characters) and a line after each silent minute.
build: env
	@echo "attnkit: CUDA archs $(ATTNKIT_CUDA_ARCHS) ($(if $(filter 1,$(HAS_GPU)),GPU present,no GPU))"
	python3 tools/build.py -- $(PY) setup.py -q build_ext --inplace --build-temp build/full

build-cpu: env
	ATTNKIT_FORCE_CPU=1 python3 tools/build.py -- $(PY) setup.py -q build_ext --inplace --build-temp build/cpu

test-cpp: env
	cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$$($(PY) -c "import sys; print(sys.executable)") >/dev/null
	cmake --build build/cpp -j 2
	ctest --test-dir build/cpp --output-on-failure

test-py: build
	$(PY) -m pytest -q tests

test: test-cpp test-py

demo: env
	@if [ "$(HAS_GPU)" = 1 ] || [ "$(ATTNKIT_DEMO_CUDA)" = 1 ]; then $(MAKE) --no-print-directory build; \
	else $(MAKE) --no-print-directory build-cpu; fi
	$(PY) tools/demo.py

bench: build
	$(PY) -m attnkit.bench $(BENCH_ARGS)

kernel-report: build
	$(PY) tools/kernel_report.py

clean:
	rm -rf build python/attnkit/_C*.so
