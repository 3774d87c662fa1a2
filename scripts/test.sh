#!/usr/bin/env bash
# Everything on a fresh clone: install, then the whole test suite against a real vLLM server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The browser test drives Debian's Chromium (a browser a test tool downloads itself never arrives here).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is not installed and this is not root: the browser test will be skipped" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
