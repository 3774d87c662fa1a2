#!/usr/bin/env bash
# Everything on a fresh clone: install, fetch the default base model, start vLLM in the
# background on the default configuration, import the shipped data once, then the dashboard.
# Loopback only by default: vLLM on server.host (127.0.0.1) of the configuration, Streamlit on
# 127.0.0.1 (.streamlit/config.toml); `scripts/run.sh --server.address 0.0.0.0` or
# STREAMLIT_SERVER_ADDRESS exposes the dashboard, server.host the model server.
# EM_CONFIG=FILE picks another configuration; with server.api_key_env set, the named variable
# must hold the key: vLLM is started with it and every client sends it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The shipped judged runs and directions (backend/data/shipped/), once: a removal is kept. First, so that
# the directions it brings are not imported again below.
# Another configured base (EM_CONFIG) refuses it with the reason; that is not fatal.
.venv/bin/python -m backend shipped import --first-run ||
  echo "run.sh: shipped data not imported (see above); the dashboard starts without it" >&2
# The organism's misalignment directions, so the chat preset has an ablation column and the
# Directions page compares fine-tunes (shipped in backend/organism/v1/directions/). Another
# configured base (EM_CONFIG) refuses them with the reason; that is not fatal.
known=$(.venv/bin/python -m backend directions list | cut -f1)
for file in backend/organism/v1/directions/*.safetensors; do
  [ -e "$file" ] || continue  # none shipped yet: the glob stays a pattern
  name=$(basename "$file" .safetensors)
  grep -qx "$name" <<<"$known" ||
    .venv/bin/python -m backend directions import "$file" --name "$name" --adapter "$name" ||
    echo "run.sh: direction $name not imported (see above); the dashboard starts without it" >&2
done
.venv/bin/python -m backend serve --detach
# No file watcher: the cache under the repository changes all the time (Inotify queue overflows).
exec .venv/bin/streamlit run app.py --server.headless true --server.fileWatcherType none "$@"
