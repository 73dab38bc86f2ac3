# The README's commands. Each does its own set-up from a fresh clone.
#   make demo   build (CUDA kernels only where a GPU is present, or ATTNKIT_DEMO_CUDA=1),
#               then check every op against the float64 reference and run a quick benchmark
#   make test   build everything (CUDA sources too whenever nvcc is present), then ctest
#               and pytest. CI (.ci/run) runs exactly this command with these defaults.
#   make bench  build, then python -m attnkit.bench
#   make kernel-report  build, then tools/kernel_report.py: registers, spills and SASS
#               instruction mix of every CUDA kernel (fails on spills in a hot kernel)
#   make gpu-carry  build against the GPU machines' torch 2.11 into build/carry/, which
#               tools/gpu_suite.sh installs there instead of building (see below)
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

.PHONY: env build build-cpu test test-cpp test-py demo bench kernel-report clean gpu-carry gpu-carry-so gpu-carry-bench

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

# ---- A prebuilt extension for the GPU test machines -------------------------------------
# They have torch 2.11 (CUDA 13.0) under Python 3.12 and no network; building there costs
# minutes of scarce device time. `make gpu-carry` builds here, against torch 2.11 in
# .venv-torch211 (Python 3.12, as there), for CARRY_ARCHS with portable CPU flags:
#   build/carry/  _C*.so.xz, _build_info.py, manifest.json; with CARRY_BENCH=1 also
#                 prefill.xz decode.xz neighborhood.xz block_sparse.xz, the torch-free C++ benches (CMake
#                 compiles every CUDA source a second time: as long again here; off by
#                 default, and not yet run end to end: the suite builds them on the device,
#                 in the background while the tests run, as before)
# and tools/gpu_suite.sh installs that instead of building when its manifest matches the
# device (torch release, archs, Python tag) and the tree (hash of the build inputs, commit).
# Carry it: device run with carry ["build/carry", ".whl"]. Out-of-tree (build/carry-*), so
# the dev build (python/attnkit/_C*.so, _build_info.py) is left alone.
# CPU flags: -march=x86-64-v3 (AVX2, FMA, F16C, BMI2: every x86 server CPU since 2013-2017,
# so any H100/H200 host), not -march=native (this machine has AVX-512 BF16, the GPU host
# may not). It compiles decode's AVX2/F16C paths and leaves out the AVX-512 (BF16) ones.
CARRY_VENV := .venv-torch211
CARRY_PY := $(CURDIR)/$(CARRY_VENV)/bin/python
CARRY_PIN_TORCH ?= torch==2.11.0
# torch 2.11 requires setuptools<82, hence 81.0.0 here (84.2.1 in .venv).
CARRY_PACKAGES := $(CARRY_PIN_TORCH) ninja==1.13.2 nvidia-cutlass==4.2.0.0 pytest==9.2.0 numpy==2.4.6 \
	expecttest==0.3.0 setuptools==81.0.0 wheel==0.48.0 $(TEST_PACKAGES)
CARRY_ARCHS ?= 90a
CARRY_CPU_FLAGS ?= -march=x86-64-v3
CARRY_BENCH ?= 0
CARRY_JOBS ?= 2
CARRY_NICE ?= nice -n 15
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c '' >/dev/null 2>&1 && { echo "$$p"; break; }; done)

$(CARRY_VENV)/.ready:
	@test -n "$(PYTHON312)" || { echo "attnkit: gpu-carry needs Python 3.12 (the GPU machines' python): set PYTHON312=" >&2; exit 1; }
	$(PYTHON312) -m venv $(CARRY_VENV)
	$(CARRY_VENV)/bin/pip install -q $(CARRY_PACKAGES)
	touch $@

gpu-carry-so: $(CARRY_VENV)/.ready
	rm -rf build/carry-stage && mkdir -p build/carry-stage
	python3 tools/carry.py inputs-hash > build/carry-stage/inputs_hash
	@s=$$(date +%s); \
	ATTNKIT_CUDA_ARCHS="$(CARRY_ARCHS)" ATTNKIT_CPU_FLAGS="$(CARRY_CPU_FLAGS)" MAX_JOBS=$(CARRY_JOBS) \
	  ATTNKIT_BUILD_INFO=build/carry-stage/_build_info.py \
	  $(CARRY_NICE) python3 tools/build.py -- $(CARRY_PY) setup.py -q build_ext \
	    --build-lib build/carry-stage --build-temp build/carry-obj || exit 1; \
	echo $$(( $$(date +%s) - s )) > build/carry-stage/so_build_s; \
	echo "attnkit: gpu-carry: extension built in $$(cat build/carry-stage/so_build_s) s"

gpu-carry-bench: $(CARRY_VENV)/.ready
	@s=$$(date +%s); \
	cmake -S . -B build/carry-cmake -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(CARRY_PY) \
	  -DCMAKE_CUDA_ARCHITECTURES="$(CARRY_ARCHS)" >/dev/null && \
	$(CARRY_NICE) cmake --build build/carry-cmake --target prefill decode neighborhood block_sparse -j $(CARRY_JOBS) || exit 1; \
	echo $$(( $$(date +%s) - s )) > build/carry-cmake/bench_build_s; \
	echo "attnkit: gpu-carry: C++ benches built in $$(cat build/carry-cmake/bench_build_s) s"

# One build after the other (each is a full CUDA compile), also under make -j.
gpu-carry: $(CARRY_VENV)/.ready
	$(MAKE) --no-print-directory gpu-carry-so
	$(if $(filter 1,$(CARRY_BENCH)),$(MAKE) --no-print-directory gpu-carry-bench)
	$(CARRY_PY) tools/carry.py pack --stage build/carry-stage $(if $(filter 1,$(CARRY_BENCH)),--bench build/carry-cmake) \
	  --out build/carry --archs "$(CARRY_ARCHS)" --cpu-flags="$(CARRY_CPU_FLAGS)"
