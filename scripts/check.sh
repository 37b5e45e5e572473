#!/usr/bin/env bash
# The gates, then every test lane: ruff (lint + format check) and mypy on the package, the layer check (no import
# circle, no import from a lower floor to a higher one), pytest. Arguments go to pytest (e.g. -m unit).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
"$py" -m ruff check tokenfab
"$py" -m ruff format --check tokenfab
"$py" -m mypy
"$py" scripts/check_layers.py
"$py" -m pytest -q "$@"
