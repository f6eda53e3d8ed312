# Two entry points: `make quickstart` (a real distillation, a few minutes on a CPU) and `make test`.
# Both create .venv from the project's own files on first use.
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
export FENNOL_PMC_DIR ?= $(SHARED)/teachers/fennol-pmc
export DISTILLER_SHARED ?= $(SHARED)

.PHONY: quickstart test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed
	$(PY) experiments/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest
