# Two entry points for a fresh machine (Python 3.11, pip; see README):
#   make demo   set everything up, then train the digits classifier with crossent's loss
#   make test   set everything up, then run the whole test suite (Triton kernels in interpreter mode)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lm-demo test test-triton36 lint
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
	$(MAKE) test-triton36

# The GPU machine's image has Triton 3.6 (CI and .venv have the newest Triton): the kernels are
# also run under Triton 3.6's interpreter and compiled for sm_90 by its compiler. That
# interpreter turns 1-element arrays into scalars, which NumPy >= 2.4 refuses and older NumPy
# warns about: this venv pins numpy<2.4 and ignores that one warning.
VENV36 ?= .venv-triton36
TRITON36_TESTS := tests/triton tests/torch/test_torch_triton_dispatch.py \
	tests/distributed/test_distributed_vocab_parallel_triton.py

$(VENV36)/.installed: pyproject.toml
	python3 -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q -U pip
	$(VENV36)/bin/python -m pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest hypothesis scipy
	$(VENV36)/bin/python -m pip install -q -e .
	touch $@

test-triton36: $(VENV36)/.installed
	TRITON_INTERPRET=1 $(VENV36)/bin/python -m pytest -q $(TRITON36_TESTS) \
		-W "ignore:Conversion of an array with ndim > 0:DeprecationWarning"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks examples
