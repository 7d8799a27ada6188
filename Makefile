# kdist: the two commands of the README, and a few helpers around CMake.
#   make demo   install dependencies, build, run the demo
#   make test   install dependencies, build, run the whole test suite
BUILD      ?= build
JOBS       ?= $(shell nproc)
BUILD_TYPE ?= Release
KD_WERROR  ?= OFF
CMAKE_ARGS ?=

.PHONY: all deps build test demo bench format format-check asan-test clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) -DKD_WERROR=$(KD_WERROR) $(CMAKE_ARGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) -- --no-print-directory

test: build format-check
	@cd $(BUILD) && ctest --output-on-failure --timeout 600 -j 2

demo: build
	@scripts/demo.sh $(BUILD)

bench: build
	@$(BUILD)/bin/kd_bench_step
	@$(BUILD)/bin/kd_bench_teacher
	@$(BUILD)/bin/kd_bench_gpt

# The whole suite once more under AddressSanitizer + UndefinedBehaviorSanitizer.
asan-test: deps
	@cmake -S . -B $(BUILD)-asan -DCMAKE_BUILD_TYPE=Debug -DKD_SANITIZER=address,undefined -DKD_WERROR=$(KD_WERROR) >/dev/null
	@cmake --build $(BUILD)-asan -j $(JOBS) -- --no-print-directory
	@# the randomized fault test keeps its 10 runs in `make test`; 4 suffice for the sanitizers
	@# tests/lsan.supp: one intermittent leak inside libzmq itself (see the file)
	@cd $(BUILD)-asan && KD_FAULT_RUNS=4 LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp:print_suppressions=0 ctest --output-on-failure --timeout 900 -j 2

format:
	@git ls-files '*.c' '*.h' | xargs clang-format -i

format-check:
	@git ls-files '*.c' '*.h' | xargs -r clang-format --dry-run --Werror

clean:
	rm -rf $(BUILD) $(BUILD)-asan
