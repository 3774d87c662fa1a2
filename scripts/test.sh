#!/usr/bin/env bash
# Everything on a fresh clone: install, then the whole test suite against a real vLLM server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
