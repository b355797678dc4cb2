# Two commands on a fresh machine: `make train` and `make test`.
# Each creates the virtual environment when there is none and installs what it needs.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=
# CI adds cuda12 so the 'CuPy installed, no GPU' path is tested for real.
TEST_EXTRAS ?= test

.PHONY: train test test-slow notebook lint verify clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-$(TEST_EXTRAS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(TEST_EXTRAS)]'
	touch $@ $(VENV)/.installed

train: $(VENV)/.installed
	$(BIN)/xpnet train $(ARGS)

# The quick tier; test-slow runs the 20-epoch trainings that check accuracy (CI runs both).
test: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/python -m pytest tests -m "not slow" $(ARGS)

test-slow: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/python -m pytest tests -m slow $(ARGS)

$(VENV)/.installed-notebook: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[notebook]'
	touch $@ $(VENV)/.installed

notebook: $(VENV)/.installed-notebook
	$(BIN)/jupyter lab notebooks/backprop_from_scratch.ipynb

lint: $(VENV)/.installed-$(TEST_EXTRAS)
	$(BIN)/ruff check src tests bench conftest.py notebooks
	$(BIN)/ruff format --check src tests bench conftest.py notebooks

verify: $(VENV)/.installed
	$(BIN)/xpnet verify --dtype float32 $(ARGS)
	$(BIN)/xpnet verify --dtype float64 $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .hypothesis
