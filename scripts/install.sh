#!/usr/bin/env bash
# Create .venv and install tokenfab with the torch build that fits this machine.
# Without a GPU the pinned CPU wheel is used (pip takes it from local disk where a mirror has it); with one,
# pip's default (CUDA) build. TOKENFAB_TORCH overrides the requirement, e.g. TOKENFAB_TORCH="torch==2.9.1".
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TOKENFAB_TORCH:-}" ]; then
    "$py" -m pip install -q "$TOKENFAB_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$py" -m pip install -q "torch==2.13.0"
  else
    "$py" -m pip install -q "torch==2.13.0" || "$py" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
extras="${1:-}"
"$py" -m pip install -q -e ".${extras:+[$extras]}"
"$py" -c "import torch, tokenfab; print('tokenfab', tokenfab.__version__, 'torch', torch.__version__)"
