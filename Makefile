# Every target creates .venv when it is missing, so `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARCH := $(shell uname -m)

# On x86_64 these two releases come from the machine's local wheel store; elsewhere pip resolves
# the ranges in pyproject.toml as usual.
ifeq ($(ARCH),x86_64)
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
else
TORCH_PIN := torch torchvision
endif

.PHONY: setup demo lab test test-fast lint notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[notebooks,dev,browser,fast-eval]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/instseg-edu demo

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup --timeout 600

test-fast: setup
	$(PY) -m pytest -x -q -m "not browser and not notebooks and not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Regenerate the paired notebooks one way: the .py files are the source of truth.
notebooks: setup
	$(VENV)/bin/jupytext --to ipynb --update notebooks/[0-9]*.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
