# The README's commands. Each does its own set-up from a fresh clone.
#   make demo   build (CUDA kernels only where a GPU is present, or ATTNKIT_DEMO_CUDA=1),
#               then check every op against the float64 reference and run a quick benchmark
#   make test   build everything (CUDA sources too whenever nvcc is present), then ctest
#               and pytest
#   make bench  build, then python -m attnkit.bench
#   make kernel-report  build, then tools/kernel_report.py: registers, spills and SASS
#               instruction mix of every CUDA kernel (fails on spills in a hot kernel)
# Python: .venv if present; else the current python3 when it already has torch (as on an
# offline GPU machine); else a new .venv with the pinned packages.
SHELL := /bin/bash
PY := $(shell if [ -x .venv/bin/python ]; then echo .venv/bin/python; \
	elif python3 -c 'import torch' >/dev/null 2>&1; then echo python3; else echo .venv/bin/python; fi)
PIN_TORCH ?= torch==2.14.1
PACKAGES := $(PIN_TORCH) ninja==1.13.2 nvidia-cutlass==4.2.0.0 pytest==9.2.0 numpy expecttest setuptools wheel
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
export PYTHONPATH := $(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: env build build-cpu test test-cpp test-py demo bench kernel-report clean

env: $(if $(filter .venv/bin/python,$(PY)),.venv/.ready)

.venv/.ready:
	python3 -m venv .venv
	.venv/bin/pip install -q $(PACKAGES)
	touch $@

# Full build: CUDA sources whenever torch has CUDA and nvcc is found.
build: env
	$(PY) setup.py -q build_ext --inplace --build-temp build/full

build-cpu: env
	ATTNKIT_FORCE_CPU=1 $(PY) setup.py -q build_ext --inplace --build-temp build/cpu

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
