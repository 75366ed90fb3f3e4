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
MYPYPATH=build/typecheck .venv/bin/mypy -p loraplex.server -p loraplex.adapters \
  -p loraplex.clients -p loraplex.bench -p loraplex.proto
