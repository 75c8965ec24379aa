# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install the package (torch pinned by constraints.txt) when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SRC := $(wildcard laplace_kron tests experiments benchmarks)

.PHONY: setup bench-setup demo test test-all lint format benchmarks docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev,experiments]"
	touch $(STAMP)

setup: $(STAMP)

# laplace-torch is a benchmark / cross-check reference only. Its torchvision dependency has no
# working CPU build next to torch 2.13 here, so install it without dependencies and remove
# torchvision (nothing we use needs it). transformers and peft are test-only (the Hugging Face
# tests); installed here, before the torchvision removal, as a dependency may pull it in.
ORACLE := $(VENV)/.oracles
$(ORACLE): $(STAMP)
	$(PIP) install --quiet -c constraints.txt --no-deps laplace-torch==0.3 asdfghjkl==0.1a4
	$(PIP) install --quiet -c constraints.txt torchmetrics opt-einsum
	$(PIP) install --quiet -c constraints.txt transformers peft
	$(PIP) uninstall --yes --quiet torchvision || true
	$(PY) -c "import transformers, peft"
	touch $(ORACLE)

bench-setup: $(ORACLE)

benchmarks: $(ORACLE)
	$(PY) benchmarks/run.py

demo: $(STAMP)
	$(VENV)/bin/laplace-kron demo

test: $(ORACLE)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check $(SRC)

format: $(STAMP)
	$(VENV)/bin/ruff format $(SRC)
	$(VENV)/bin/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

docs: $(STAMP)
	$(PY) docs/gen_api.py
