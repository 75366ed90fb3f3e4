#!/usr/bin/env bash
# ruff and mypy over the package. mypy cannot follow the editable install's import hook,
# so it reads the subpackages through a folder of links named like the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
view=build/typecheck/loraplex
mkdir -p "$view"
for pkg in server adapters clients bench proto; do ln -sfn "$PWD/$pkg" "$view/$pkg"; done
# `mypy -p` does not descend into the linked folders, so every module is named explicitly.
modules=()
for pkg in server adapters clients bench proto; do
  while IFS= read -r file; do
    module="${file%.py}"
    module="${module%/__init__}"
    modules+=(-m "loraplex.${module//\//.}")
  done < <(find "$pkg" -name '*.py' ! -name '*_pb2*.py' | sort)
done
MYPYPATH=build/typecheck .venv/bin/mypy "${modules[@]}"
