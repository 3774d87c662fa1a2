#!/usr/bin/env bash
# Everything on a fresh clone: install, fetch the default base model, start vLLM in the
# background on the default configuration, then the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m backend serve --detach
exec .venv/bin/streamlit run app.py --server.headless true "$@"
