#!/usr/bin/env bash
# Builds llama.cpp's llama-server, the peer of benchmarks/vs_llamacpp.py, from the sources that the
# llama-cpp-python sdist ships (a package registry is all this needs: no git, no model hub). Only the server
# target; web UI, downloads (curl/openssl), tests and examples off. Idempotent: an existing build is kept.
#
#   bash benchmarks/build_llamacpp.sh [PEER_DIR] [PYTHON] [VERSION]      (what `make peer` runs)
set -euo pipefail
PEER=${1:-.peer}
PYTHON=${2:-.venv/bin/python}
VERSION=${3:-0.3.36}
SRC="$PEER/llama_cpp_python-$VERSION/vendor/llama.cpp"
mkdir -p "$PEER"
# its converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) import sentencepiece; torch, transformers and
# numpy are ours already
"$PYTHON" -m pip install --disable-pip-version-check -q "sentencepiece==0.2.3"
if [ -x "$PEER/bin/llama-server" ] && [ -d "$SRC" ]; then
    echo "llama-server already built: $PEER/bin/llama-server"
    exit 0
fi
if [ ! -f "$PEER/llama_cpp_python-$VERSION.tar.gz" ]; then
    "$PYTHON" -m pip download --disable-pip-version-check -q "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$PEER"
fi
tar xzf "$PEER/llama_cpp_python-$VERSION.tar.gz" -C "$PEER"
cmake -S "$SRC" -B "$SRC/build" $(command -v ninja >/dev/null && echo -G Ninja) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >"$PEER/cmake.log"
cmake --build "$SRC/build" --target llama-server -j "$(nproc)"
mkdir -p "$PEER/bin"
cp "$SRC/build/bin/llama-server" "$PEER/bin/llama-server"
echo "built $PEER/bin/llama-server (llama.cpp from llama-cpp-python $VERSION)"
