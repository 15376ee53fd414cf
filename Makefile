# DeepSeek from Scratch. `make lab` to learn, `make test` to check everything.
PYTHON_SYS ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
PY         := $(BIN)/python
# Installed only where the venv cannot import torch already (Colab and a GPU box keep theirs).
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.installed
NB         ?= notebooks/[0-9][0-9]_*.ipynb
ARGS       ?=
PYTEST_ARGS ?=

.PHONY: setup lab test unit notebooks lint execute bench clean seeds

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON_SYS) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed"'
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

# Jupyter refuses to start as root (containers, cloud boxes) unless told it may.
ROOT_FLAG  := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup
	$(BIN)/jupyter lab notebooks $(ROOT_FLAG) $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: setup
	$(PY) -m pytest -m "not notebook" $(PYTEST_ARGS)

notebooks: setup
	$(PY) -m pytest tests/test_notebooks.py $(PYTEST_ARGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

# Re-run notebooks in place (NB=notebooks/01_*.ipynb for one) to refresh committed outputs.
execute: setup
	$(PY) tools/notebook_checks.py execute $(NB)

bench: setup
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The training notebooks for seeds 0-4 (not part of `make test`; about 90 minutes on 2 cores):
# every assert must hold for each seed; writes notebooks/SEEDS.md.
seeds: setup
	$(PY) tools/seeds.py $(ARGS)
