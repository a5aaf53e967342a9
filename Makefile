# Two commands do all the set-up on a fresh machine (see README.md):
#   make quickstart   virtual environment + azllm's core (CPU torch; no extras) + `azllm quickstart`
#   make test         the same + every extra and the test tools ('.[test]') + lint + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint install clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "azllm needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

# llama-cpp-python (in the test extras) compiles llama.cpp: portable flags, so a cached wheel
# runs on any x86-64 machine, and no multimodal library we do not use.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -q -e '.[test]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/azllm quickstart

lint: $(VENV)/.installed-test
	$(BIN)/ruff check azllm tests bench notebooks
	$(BIN)/ruff format --check azllm tests bench notebooks

test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
