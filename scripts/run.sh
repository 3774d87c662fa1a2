#!/usr/bin/env bash
# Everything on a fresh clone: install, start vLLM in the background on the
# default configuration (the shipped pocket organism), then the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The organism's medical misalignment direction, so the chat preset has an ablation column.
.venv/bin/python -m backend directions list 2>/dev/null | grep -qw medical ||
  .venv/bin/python -m backend directions import backend/organism/artifacts/medical_mean_diff.safetensors \
    --name medical --adapter medical --drop-first
.venv/bin/python -m backend serve --detach
exec .venv/bin/streamlit run app.py --server.headless true "$@"
