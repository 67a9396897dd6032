# Two entry points (see README): `make analysis` and `make test`. Both build the
# virtual environment first: torch is installed on its own, before the project, so pip
# takes the CPU build pinned here instead of resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OUT ?= rope_leak_out

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install analysis test
install: $(VENV)/.installed

analysis: $(VENV)/.installed
	$(VENV)/bin/rope-leak analyze --out $(OUT) --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest
