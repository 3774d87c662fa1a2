#!/usr/bin/env bash
# Everything on a fresh clone: install, fetch the default base model, start vLLM in the
# background on the default configuration, then the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The organism's misalignment directions, so the chat preset has an ablation column and the
# Directions page compares fine-tunes (shipped in backend/organism/v1/directions/).
known=$(.venv/bin/python -m backend directions list | cut -f1)
for file in backend/organism/v1/directions/*.safetensors; do
  name=$(basename "$file" .safetensors)
  grep -qx "$name" <<<"$known" ||
    .venv/bin/python -m backend directions import "$file" --name "$name" --adapter "$name"
done
.venv/bin/python -m backend serve --detach
# No file watcher: the cache under the repository changes all the time (Inotify queue overflows).
exec .venv/bin/streamlit run app.py --server.headless true --server.fileWatcherType none "$@"
