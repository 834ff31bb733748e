# pydl developer commands. `make test` is what CI runs (.ci/run); it sets up everything itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CI and this Makefile build the CUDA kernels for Hopper only (sm_90a) to keep the build short;
# `pip install .` uses the CMake default (80;90a).
export PYDL_CUDA_ARCHS ?= 90a
SANITIZE_LIB_DIR := build/sanitize-lib

.PHONY: all env build test test-fast test-sanitize test-cuda-emulated bench info clean

all: test

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 numpy triton pytest hypothesis matplotlib \
		setuptools wheel pybind11 "cmake>=3.24" ninja
	touch $@

env: $(VENV)/.deps

build: env
	$(PY) setup.py -q build_ext --inplace

info: build
	$(PY) -m pydl info

# The full suite: CUDA tests skip (no GPU here), Triton kernels run in the interpreter.
test-fast: build
	$(PY) -m pytest -q tests

# CPU kernels again under AddressSanitizer + UndefinedBehaviorSanitizer (a separate build).
test-sanitize: env
	rm -f build/sanitizer-report.*
	PYDL_SANITIZE=address,undefined PYDL_CUDA=OFF PYDL_BUILD_TYPE=Debug \
		$(PY) setup.py -q build_ext -b $(SANITIZE_LIB_DIR)
	PYDL_NATIVE_LIB=$$(ls $(SANITIZE_LIB_DIR)/pydl/_C*.so) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=build/sanitizer-report \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=build/sanitizer-report \
		$(PY) -m pytest -q -p no:cacheprovider tests/ops -m "not triton and not cuda" -k "native" -x \
		|| { cat build/sanitizer-report.* 2>/dev/null; exit 1; }

# The CUDA kernels *executed* on the CPU: tests/cuda_emulation/mock runs every CUDA thread as a
# fiber with real barriers and warp shuffles (no GPU needed); "quick" covers N up to 2048.
EMU_BIN := build/cuda-emulated-layer-norm
test-cuda-emulated:
	mkdir -p build
	g++ -std=c++20 -O2 -Itests/cuda_emulation/mock -Icsrc/include -x c++ csrc/cuda/layer_norm.cu \
		-x none tests/cuda_emulation/test_layer_norm.cpp csrc/layer_norm_args.cpp csrc/tensor_view.cpp \
		-o $(EMU_BIN) -lpthread
	$(EMU_BIN) quick

test: test-fast test-sanitize test-cuda-emulated

# The main job: the benchmark harness on whatever device is here (GPU if present).
bench: build
	$(PY) -m pydl.bench --out benchmarks/results/latest

clean:
	rm -rf build pydl/_C*.so .pytest_cache
