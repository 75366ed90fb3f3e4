#!/usr/bin/env bash
# ruff and mypy over the package. mypy cannot follow the editable install's import hook,
# so it reads the subpackages through a folder of links named like the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
.venv/bin/ruff check .
.venv/bin/ruff format --check .
view=build/typecheck/loraplex
mkdir -p "$view"
packages=(server adapters clients bench proto)
for pkg in "${packages[@]}"; do ln -sfn "$root/$pkg" "$view/$pkg"; done
cd build/typecheck
"$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" "${packages[@]/#/loraplex/}"
