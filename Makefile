# Two entry points for a fresh machine: `make demo` (the main job on embedded phantoms) and `make test`.
# Both create .venv and install hagan into it first. On a GPU machine, pick your CUDA build of torch
# with TORCH_SPEC, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test test-slow install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test,dicom]'
	$(BIN)/python -m pip install --quiet --no-deps deepbet==1.0.2
	touch $@

demo: install
	rm -rf runs/demo
	$(BIN)/hagan demo --out runs/demo

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow
