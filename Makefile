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

.PHONY: setup demo lab test test-fast lint notebooks clean gpu-wheels gpu-check

setup: $(STAMP)

# PyTorch's x86_64 wheels with their CUDA libraries take about 6 GB in the venv: say so up front
# rather than let pip stop halfway with "No space left on device".
MIN_FREE_GB ?= 8

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(MIN_FREE_GB) ]; then \
		echo "make setup: only $$free GB free on this disk; the venv (torch included) needs about $(MIN_FREE_GB) GB" >&2; \
		exit 1; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[notebooks,dev,browser,fast-eval]'
	touch $(STAMP)

# The demo trains the family with the best masks on a CPU (Mask R-CNN) with the recipe of this
# machine's tier (instseg_edu/recipes.py) for DEMO_MINUTES of training: its learning-rate
# schedule follows the clock and ends at the limit, however long a step takes on this machine
# this hour (it varies between machines and, on a shared one, between hours).
# `instseg-edu demo --model solo` for another family.
DEMO_MINUTES ?= 5
demo: setup
	$(VENV)/bin/instseg-edu demo --minutes $(DEMO_MINUTES)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup --timeout 600 --durations 15

test-fast: setup
	$(PY) -m pytest -x -q -m "not browser and not notebooks and not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Regenerate the paired notebooks one way: the .py files are the source of truth.
notebooks: setup
	$(VENV)/bin/jupytext --to ipynb --update notebooks/[0-9]*.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# The GPU check (benchmarks/gpu_check.py, benchmarks/RESULTS.md). `gpu-wheels` runs where a package
# registry is reachable and fills .whl/ with the wheels that a GPU machine without one lacks
# (benchmarks/gpu_wheels.txt, for CPython 3.12 on manylinux x86_64); `gpu-check` runs on the GPU
# machine with its own python3, no .venv needed, and installs those wheels without network.
GPU_PYTHON_VERSION ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
GPU_CHECK_OUT ?= runs/gpu_check

gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl -r benchmarks/gpu_wheels.txt
	@ls .whl | wc -l | xargs echo "wheels:"; du -sh .whl

gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)
