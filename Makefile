# The two commands a newcomer needs (README): `make demo` and `make test`.
# Both create .venv with pip; torch is pinned first so pip takes the local CPU build
# instead of resolving a multi-GB CUDA build (see README, "Install").
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

.PHONY: setup demo test bench
setup: $(VENV)/.installed

demo: setup
	rm -rf runs/demo
	$(VENV)/bin/veil train --config lightning_modules/configs/synthetic32.yaml --out runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/dp_step.py
