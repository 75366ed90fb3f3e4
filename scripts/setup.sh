#!/usr/bin/env bash
# Creates .venv with everything loraplex needs, on a machine with or without a GPU.
#   - torch: the CPU build where no NVIDIA GPU is present (never the multi-GB CUDA wheels),
#     a CUDA build where one is.
#   - llama-cpp-python compiles from source (~10 min on 2 cores) with loraplex's llama.cpp
#     patch applied (patches/llama.cpp/: per-sequence LoRA); the wheel is built once into
#     $LORAPLEX_WHEEL_CACHE (default ~/.cache/loraplex/wheels), keyed by the patch's hash.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${LORAPLEX_TORCH_VERSION:-2.13.0}
LLAMA_VERSION=0.3.36
WHEELS=${LORAPLEX_WHEEL_CACHE:-$HOME/.cache/loraplex/wheels}
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n==> %s\n' "$*" >&2; }
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
PIP=(.venv/bin/python -m pip install -q)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  index=()
  [ -n "${LORAPLEX_TORCH_INDEX:-}" ] && index=(--index-url "$LORAPLEX_TORCH_INDEX")
  if has_gpu; then
    step "installing torch $TORCH_VERSION (CUDA build: an NVIDIA GPU is present)"
  else
    step "installing torch $TORCH_VERSION (CPU build: no GPU found)"
    # Elsewhere than this project's machines, point LORAPLEX_TORCH_INDEX at
    # https://download.pytorch.org/whl/cpu to get the CPU wheel.
  fi
  "${PIP[@]}" "${index[@]}" "torch==$TORCH_VERSION"
fi

PATCH=patches/llama.cpp/per-sequence-lora.patch
PATCH_HASH=$(sha256sum "$PATCH" | cut -c1-16)
LLAMA_WHEELS="$WHEELS/llama-cpp-python-$LLAMA_VERSION-$PATCH_HASH"
# Which patch the installed llama-cpp-python was built with: a changed patch reinstalls.
INSTALLED_PATCH=.venv/llama-cpp-patch-hash
if ! ls "$LLAMA_WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  step "building llama-cpp-python $LLAMA_VERSION with $PATCH (about 10 minutes, once)"
  src=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$src"
  tar xzf "$src"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$src"
  patch -p1 --quiet -d "$src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" < "$PATCH"
  cmake_args=${CMAKE_ARGS:-}
  has_gpu && cmake_args="${cmake_args} -DGGML_CUDA=on"
  CMAKE_ARGS="$cmake_args" .venv/bin/python -m pip wheel -q --no-deps \
    "$src/llama_cpp_python-$LLAMA_VERSION" -w "$LLAMA_WHEELS"
  rm -rf "$src"
fi
if [ "$(cat "$INSTALLED_PATCH" 2>/dev/null)" != "$PATCH_HASH" ]; then
  step "installing the patched llama-cpp-python"
  "${PIP[@]}" --force-reinstall --no-deps "$LLAMA_WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  echo "$PATCH_HASH" > "$INSTALLED_PATCH"
fi

# llama.cpp's own converters (HF -> GGUF, PEFT -> GGUF-LoRA) from the same source release:
# the tests build tiny GGUF bases with them and check loraplex's GGUF export against them.
CONVERT=.venv/share/llama.cpp-convert-$LLAMA_VERSION
if [ ! -f "$CONVERT/convert_lora_to_gguf.py" ]; then
  step "keeping llama.cpp's conversion scripts from llama-cpp-python $LLAMA_VERSION"
  src=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$src"
  tar xzf "$src"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$src" --wildcards \
    '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
    '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
  rm -rf "$CONVERT" && mkdir -p "$(dirname "$CONVERT")"
  mv "$src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" "$CONVERT"
  rm -rf "$src"
fi

step "installing loraplex and its dependencies"
"${PIP[@]}" --find-links "$LLAMA_WHEELS" -e ".[gguf,bench,dev,fleet,s3]"

if ! has_gpu && .venv/bin/python -m pip list 2>/dev/null | grep -q '^nvidia-'; then
  echo "warning: CUDA packages were installed on a machine without a GPU" >&2
fi
step "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
