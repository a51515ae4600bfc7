# kdkit: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned here (the CPU wheel this machine provides); pyproject.toml states the range.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test lint bench-mnist clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/kdkit demo

test: venv
	$(VENV)/bin/ruff check kdkit tests benchmarks examples
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check kdkit tests benchmarks examples

bench-mnist: venv
	$(PY) benchmarks/mnist_lenet.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
