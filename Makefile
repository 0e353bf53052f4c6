# Two commands do all the set-up on a fresh machine:
#   make train   -> virtual env + install (first time), then train LeNet-5 on MNIST with the handmade ops
#   make test    -> virtual env + install (first time), then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# MNIST: an existing torchvision-layout folder (MNIST_ROOT, or ../shared/mnist when present); else download.
MNIST_ROOT ?= $(if $(wildcard ../shared/mnist/MNIST),../shared/mnist,)
ARGS ?=

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: install train test lint bench parity
install: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train_mnist.py $(if $(MNIST_ROOT),--data-dir $(MNIST_ROOT),) $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

parity: $(VENV)/.installed
	$(PY) -m parity --quick

bench: $(VENV)/.installed
	$(PY) -m parity bench $(ARGS)
