# Everyday commands. `make demo` and `make test` do all their own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUNTIME := $(VENV)/.runtime-stamp
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-all lint bench data browser clean gpu-bundle gpu-check

# The demo needs the runtime only; the tests add the dev tools (Ray, pytest, playwright, ...) on top.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist (original IDX files) where the machine allows it.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$BENCH_DATA" ]; then \
		true; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "could not install dataset-fashion-mnist; pass --data-root DIR with the Fashion-MNIST IDX files"; \
	else \
		echo "Fashion-MNIST not found: run 'sudo apt-get install dataset-fashion-mnist', or set BENCH_DATA=DIR" \
		     "to a folder with the IDX files (train-images-idx3-ubyte.gz, ...)"; \
	fi

# Chromium from Debian for the HTML report's browser tests (tests/test_html.py; they skip without it).
browser:
	@if command -v chromium >/dev/null || [ -n "$$BENCH_CHROMIUM" ]; then \
		true; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
		echo "could not install chromium; the HTML report's browser tests will skip"; \
	else \
		echo "chromium not found: 'sudo apt-get install chromium' (or BENCH_CHROMIUM=PATH) runs the HTML report's" \
		     "browser tests; they skip without it"; \
	fi

demo: $(RUNTIME) data
	$(VENV)/bin/bench run --methods dpsad,dpsad-e2e,dpdm,dpmerf --eps 10 --dataset fmnist --profile demo
	$(VENV)/bin/bench report >/dev/null && echo "tables, plots and the page reports/index.html (open it in a browser)"

test: $(STAMP) data browser
	$(VENV)/bin/pytest -q

test-all: $(STAMP) data browser
	$(VENV)/bin/pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/pytest benchmarks/bench_*.py --benchmark-only -q --benchmark-min-rounds=5

# A lent GPU machine (PyTorch, no registry): `make gpu-bundle` here writes .gpu/ (the wheels the GPU image lacks
# and Fashion-MNIST, at most 60 MiB); `make gpu-check` there installs them beside the image's torch and measures
# (bench/gpucheck.py), writing at most four files to $(OUT). `make gpu-check DEVICE=cpu QUICK=1` runs the same
# script on a CPU with tiny settings (the test suite does too).
OUT ?= gpu-check-out
DEVICE ?= cuda
GPU_SITE ?= /tmp/bench-site
gpu-bundle: $(RUNTIME) data
	$(PY) -m bench.gpubundle --out .gpu
	@{ git rev-parse --short HEAD 2>/dev/null && { git diff --quiet HEAD 2>/dev/null || echo "with uncommitted changes"; }; } \
		| paste -sd ' ' > .gpu/commit

ifeq ($(DEVICE),cpu)
gpu-check: $(STAMP)
	$(PY) -m bench.gpucheck --out $(OUT) --device cpu $(if $(QUICK),--quick) --tests tests $(GPU_ARGS)
else
gpu-check:
	@test -d .gpu/wheels || { echo "no .gpu/ here: run 'make gpu-bundle' on a machine that reaches PyPI, and carry .gpu"; exit 2; }
	rm -rf $(GPU_SITE) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
		--no-build-isolation --target $(GPU_SITE) .gpu/wheels/*.whl . && rm -rf build
	cd /tmp && PYTHONPATH=$(GPU_SITE) python3 -m bench.gpucheck --out $(abspath $(OUT)) --device $(DEVICE) \
		--data-root $(CURDIR)/.gpu/data --tests $(CURDIR)/tests --commit-file $(CURDIR)/.gpu/commit \
		$(if $(QUICK),--quick) $(GPU_ARGS)
endif

clean:
	rm -rf $(VENV) build *.egg-info
