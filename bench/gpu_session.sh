#!/usr/bin/env bash
# (The H200 session of issue #19: bench/h200_session.sh.)
# One step of the GPU benchmark session on the lent H100 host (the device tool runs each step as
# one command of at most 10 minutes, in a copy of this repository; $OUT comes back).
#
#   carry N   keep wheel piece N (.wheelhouse/parts/wheels.tar.partNN, carried by the call) in /root/wh
#   a         last piece, then: join + offline install (scripts/wheelhouse.py), build the random
#             Qwen2.5-14B shape and the paper's adapters, hook-engine reference (bench_gpu.py)
#   b         `python -m backend serve` (CUDA build), status, then correctness, slider, decode, prefill
#   c         the evaluation on the same server (stopped after), then the report
#   d         decode with LoRA layers on every module (where the LoRA time goes), then the report
#
# Pieces are made with: python3 scripts/wheelhouse.py split .wheelhouse --piece-mib 58
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ROOT=/root/em-gpu
OUT=${OUT:-/tmp/out}
step=$1
log="$OUT/$step.log"
mkdir -p "$OUT" /root/wh
exec > >(tee "$log") 2>&1
bench() { python3 bench/bench_gpu.py --root "$ROOT" --limits bench/results/gpu-h100-limits.json "$@"; }
report() { bench report --out "$OUT/gpu-h100.md" >/dev/null && cp "$ROOT"/results/*.json "$OUT"/ 2>/dev/null; }
t0=$(date +%s)
left() { echo $(( 560 - ($(date +%s) - t0) )); }  # seconds left before the 10-minute limit, with margin
case "$step" in
  carry)
    cp .wheelhouse/parts/wheels.tar.part"$(printf %02d "$2")" /root/wh/ && ls -la /root/wh
    ;;
  a)
    cp .wheelhouse/parts/wheels.tar.part* /root/wh/
    python3 scripts/wheelhouse.py join /root/wh --out /root/wheelhouse || exit 1
    python3 scripts/wheelhouse.py install /root/wheelhouse --python python3 || exit 1
    echo "installed after $(( $(date +%s) - t0 )) s"
    bench build || exit 1
    echo "built after $(( $(date +%s) - t0 )) s"
    timeout "$(left)" python3 bench/bench_gpu.py --root "$ROOT" reference
    echo "reference after $(( $(date +%s) - t0 )) s"
    cp "$ROOT"/results/*.json "$OUT"/
    ;;
  b)
    python3 -m backend --config "$ROOT/config.toml" serve --detach || { tail -50 "$ROOT"/cache/logs/vllm-*.log; exit 1; }
    echo "served after $(( $(date +%s) - t0 )) s"
    python3 -m backend --config "$ROOT/config.toml" status --json
    timeout "$(left)" python3 bench/bench_gpu.py --root "$ROOT" serve --keep-server
    echo "serve phase after $(( $(date +%s) - t0 )) s"
    tail -c 200000 "$ROOT"/cache/logs/vllm-*.log > "$OUT/vllm-b.log"
    report
    ;;
  c)
    timeout "$(left)" python3 bench/bench_gpu.py --root "$ROOT" eval --end-by "$(( t0 + 460 ))"
    echo "eval after $(( $(date +%s) - t0 )) s"
    python3 -m backend --config "$ROOT/config.toml" stop
    report
    ;;
  d)
    timeout "$(left)" python3 bench/bench_gpu.py --root "$ROOT" lora-modules
    echo "lora-modules after $(( $(date +%s) - t0 )) s"
    report
    ;;
esac
