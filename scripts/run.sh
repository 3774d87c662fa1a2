#!/usr/bin/env bash
# Everything on a fresh clone: install, build what the default configuration
# needs, start vLLM in the background, then the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m backend testmodels --out cache/models  # skips what exists
.venv/bin/python -m backend serve --detach
exec .venv/bin/streamlit run app.py --server.headless true "$@"
