# Two entry points for a fresh machine (Python 3.11, pip; see README):
#   make demo   set everything up, then train the digits classifier with crossent's loss
#   make test   set everything up, then run the whole test suite (Triton kernels in interpreter mode)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lm-demo test lint bench-cpu
setup: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q -e .
	touch $@

demo: setup
	$(VENV)/bin/crossent demo

lm-demo: setup
	$(PY) examples/tiny_lm.py

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples
