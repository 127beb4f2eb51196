# Thin wrapper around CMake. `make run` and `make test` do every set-up step themselves.
BUILD ?= build
ASAN_BUILD ?= build-asan
PREFIX ?= /usr/local
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
ifneq ($(NVCC),)
  CMAKE_ARGS += -DCMAKE_CUDA_COMPILER=$(NVCC)
endif

.PHONY: all deps configure build test test-asan run install docs format lint clean

all: build

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_INSTALL_PREFIX=$(PREFIX) $(CMAKE_ARGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@cd $(BUILD) && ctest -j $(JOBS) --output-on-failure --timeout 600

# Address and undefined-behaviour sanitizers over the CPU code (the CUDA code is checked
# with compute-sanitizer on the GPU machines instead).
test-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -G Ninja -DMOECOMM_ASAN=ON -DMOECOMM_CUDA=OFF >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest -j $(JOBS) --output-on-failure --timeout 900

# The main job: a dispatch/combine run on the GPUs present, or on host ranks where there are none.
run: build
	@scripts/run-main.sh $(BUILD)

install: build
	@cmake --install $(BUILD) --prefix $(PREFIX)

# docs/env.md is generated from the env table.
docs: build
	@$(BUILD)/tools/moecomm-info --env-markdown > docs/env.md

SOURCES = $(shell git ls-files '*.h' '*.cc' '*.cu' '*.cuh' '*.c')
format:
	@clang-format -i $(SOURCES)

lint: build
	@clang-tidy -p $(BUILD) --quiet $(filter %.cc,$(SOURCES))

clean:
	@rm -rf $(BUILD) $(ASAN_BUILD)
