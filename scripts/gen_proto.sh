#!/usr/bin/env bash
# Regenerate the committed Python stubs from proto/v1/*.proto.
# The stubs must import each other as loraplex.proto.v1.*, so protoc runs on a temporary
# include tree laid out as loraplex/proto/v1/ and the results are copied back.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-proto/v1}"
python="${PYTHON:-.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src/loraplex/proto/v1" "$tmp/out"
cp proto/v1/*.proto "$tmp/src/loraplex/proto/v1/"
# protoc wants the mypy plugins as executables; run them with the same interpreter.
python_abs="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
plugin() {  # plugin NAME FUNCTION: an executable running mypy_protobuf.main.FUNCTION
  printf '#!/bin/sh\nexec "%s" -c "import sys; from mypy_protobuf.main import %s; sys.exit(%s())"\n' \
    "$python_abs" "$2" "$2" >"$tmp/$1"
  chmod +x "$tmp/$1"
}
plugin protoc-gen-mypy main
plugin protoc-gen-mypy_grpc grpc
"$python" -m grpc_tools.protoc -I "$tmp/src" \
  --python_out="$tmp/out" --grpc_python_out="$tmp/out" \
  --plugin=protoc-gen-mypy="$tmp/protoc-gen-mypy" --mypy_out="$tmp/out" \
  --plugin=protoc-gen-mypy_grpc="$tmp/protoc-gen-mypy_grpc" --mypy_grpc_out="$tmp/out" \
  "$tmp"/src/loraplex/proto/v1/*.proto
mkdir -p "$out_dir"
cp "$tmp"/out/loraplex/proto/v1/*_pb2*.py* "$out_dir/"
