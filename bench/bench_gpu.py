"""The GPU benchmark of the whole stack: one script, every case, one table.

    python3 bench/bench_gpu.py --root /root/em-gpu build        # random Qwen2.5-14B shape + the paper's adapters
    python3 bench/bench_gpu.py --root /root/em-gpu reference    # hook engine (transformers): speed + exact logprobs
    python3 bench/bench_gpu.py --root /root/em-gpu serve        # vLLM: correctness, slider latency, decode/prefill
    python3 bench/bench_gpu.py --root /root/em-gpu eval         # 8 questions x 100 samples x 3 conditions, judged
    python3 bench/bench_gpu.py --root /root/em-gpu lora-modules # the same decode cases with LoRA on every module
    python3 bench/bench_gpu.py --root /root/em-gpu report --out bench/results/gpu-h100.md

Phases are separate commands because a lent GPU host runs at most 10 minutes per command;
each phase writes ROOT/results/PHASE.json and `report` joins them with the hardware limits
(bench/gpu_limits.py, measured in the same session) into the table. Every vLLM figure goes
through the project's own code path: `backend.serving.start_server` (the CUDA build),
`ConditionRunner` for compiled ablations, the OpenAI-compatible API, `run_eval` for the
evaluation. The weights are random: none of the speed figures depend on their values.
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

from common import percentile  # noqa: E402

SHAPE = "qwen2.5-14b"
DIRECTION = "bench-mean-residual"
CONCURRENCY = (1, 8, 64, 256)
PROMPT_TOKENS = 64
NEW_TOKENS = 128
RUNS = 3
EVAL_SAMPLES = 100
LORA_CONCURRENCY = (1, 64, 256)
SMOKE = False  # --smoke: the 0.5B shape and tiny counts, to check the script end to end on a CPU


def paths(root: Path) -> dict[str, Path]:
    models = root / "models"
    return {"base": models / SHAPE, "em": models / f"{SHAPE}-em-9xrank1", "rank32": models / f"{SHAPE}-em-rank32",
            "cache": root / "cache", "results": root / "results"}


def layer_of_direction(n_layers: int) -> int:
    return n_layers // 2


def save(root: Path, phase: str, data: dict) -> None:
    out = paths(root)["results"] / f"{phase}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"saved {out}: {', '.join(data)}", flush=True)


def make_config(root: Path, *, adapters: dict[str, Path], lora_target_modules="auto", name: str = "config",
                port: int = 8765):
    """Write ROOT/NAME.toml (so that `python -m backend --config ROOT/NAME.toml ...` works on the host
    too) and load it."""
    from backend.config import load_config
    p = paths(root)
    # Its own cache per configuration: a server records itself in its cache folder.
    cache = p["cache"] if name == "config" else root / f"cache-{name}"
    lines = [f'base_model = "{p["base"]}"', f'cache_dir = "{cache}"', "[adapters]",
             *(f'{adapter} = "{path}"' for adapter, path in adapters.items()),
             "[server]", f"port = {port}", "max_loras = 4", "max_cpu_loras = 16", "max_model_len = 2048",
             'dtype = "bfloat16"', "startup_timeout_s = 900", f"lora_target_modules = {json.dumps(lora_target_modules)}",
             *([] if SMOKE else ["gpu_memory_utilization = 0.85"]),
             "[judge]", 'model = "base"', "max_concurrency = 256"]
    path = root / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


# ---------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------

def phase_build(root: Path) -> dict:
    from backend.testmodels import PAPER_EM_LAYERS, build_paper_suite
    started = time.perf_counter()
    built = build_paper_suite(root / "models", SHAPE, em_layers=(1, 2) if SMOKE else PAPER_EM_LAYERS)
    make_config(root, adapters={"em": built["em-9xrank1"]})  # ROOT/config.toml for `python -m backend`
    return {"shape": SHAPE, "paths": {k: str(v) for k, v in built.items()}, "seconds": time.perf_counter() - started}


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
    model, tokenizer = load_model(p["base"], None, device=device, dtype=torch.bfloat16)
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
    prompt = list(range(1000, 1000 + PROMPT_TOKENS))
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
    return {"layer": layer, "direction": DIRECTION, "load_s": load_s, "check_ids": check_ids,
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


def prefill_round(url: str, model: str, concurrency: int, length: int, run: int) -> dict:
    """Distinct prompts, within a round and across rounds: the prefix cache must serve none."""
    prompts = [[(1000 + 7919 * ((run * concurrency + index) * length + i)) % 150000 + 1000 for i in range(length)]
               for index in range(concurrency)]
    return asyncio.run(completions_round(url, [{"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
                                               for prompt in prompts], "prompt_tokens"))


def decode_table(url: str, cases: dict[str, list[str]], concurrencies=None, runs: int | None = None) -> dict:
    concurrencies, runs = concurrencies or CONCURRENCY, runs or RUNS
    prompt = list(range(1000, 1000 + PROMPT_TOKENS))
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
        "effect_served_vs_reference_max_abs": max(
            abs((sa - se) - (ra - re))
            for row in zip(served["em_ablated"], served["em"], want["em_ablated"], want["em"])
            for sa, se, ra, re in zip(*row)),
        "tolerance": 0.02,
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
    keep_server leaves the server running for the eval phase (start_server finds it again)."""
    from backend.conditions import Condition, ConditionRunner
    from backend.serving import start_server, stop_server

    p = paths(root)
    reference = json.loads((p["results"] / "reference.json").read_text())
    config = make_config(root, adapters={"em": p["em"]})
    started = time.perf_counter()
    state = start_server(config)
    result: dict = {"startup_s": state.startup_s or time.perf_counter() - started, "max_lora_rank": state.max_lora_rank,
                    "lora_target_modules": state.lora_target_modules, "max_loras": state.max_loras}
    try:
        runner = ConditionRunner(config)
        layer = reference["layer"]
        ablated = Condition(adapter="em", direction=DIRECTION, layer=layer, strength=1.0)
        em_name = runner.served_model(Condition(adapter="em"))
        ablated_name = runner.served_model(ablated)
        base_name = runner.client.served_name(runner.served_model(Condition()))

        previous = json.loads((p["results"] / "serve.json").read_text()) if (p["results"] / "serve.json").exists() else {}
        if "slider" in previous:  # a rerun after a failure later on keeps what was measured
            result.update({k: previous[k] for k in ("correctness", "slider", "startup_s")})
        else:
            measure_correctness_and_slider(root, state, runner, reference, result, ablated,
                                           (base_name, em_name, ablated_name), slider_trials)

        # The slider's adapters may have evicted these (least recently used first): load them again.
        em_name, ablated_name = runner.served_model(Condition(adapter="em")), runner.served_model(ablated)
        result["decode"] = decode_table(state.url, {
            "base": [base_name], "EM": [em_name], "EM + ablation": [ablated_name],
            "mixed (base, EM, EM + ablation)": [base_name, em_name, ablated_name]})
        save(root, "serve", result)
        concurrency, length = (2, 64) if SMOKE else (32, 1024)
        prefill = [prefill_round(state.url, base_name, concurrency, length, run) for run in range(RUNS)]
        result["prefill"] = {"median": statistics.median(r["tokens_per_s"] for r in prefill), "runs": prefill,
                             "concurrency": concurrency, "prompt_tokens": length, "distinct_rounds": True}
    finally:
        if not keep_server:
            stop_server(config)
    return result


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
               end_by: float | None = None) -> dict:
    """With a deadline the run is cancelled then (the runner writes what is finished and stops):
    the figures are then those of the samples done, and the status says 'interrupted'."""
    import threading

    from backend.evaluation import RunSpec, run_eval
    from backend.serving import start_server, stop_server
    from backend.store import Store

    p = paths(root)
    layer = json.loads((p["results"] / "reference.json").read_text())["layer"]
    config = make_config(root, adapters={"em": p["em"]})
    questions = eight_questions(root / "eight_questions.yaml")
    store = Store(root / "eval.duckdb")
    started = time.perf_counter()
    state = start_server(config)  # the serve phase's server when it was kept
    startup_s = time.perf_counter() - started
    if end_by is not None:  # an absolute end (epoch seconds): what the server's start left of it
        deadline_s = min(deadline_s or float("inf"), max(1.0, end_by - time.time()))
    try:
        conditions = ("base", "adapter=em", f"adapter=em,direction={DIRECTION},layer={layer},strength=1")
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
        stop_server(config)
    return {"server_reused": startup_s < 5, "startup_s": startup_s, "url": state.url, "run_id": outcome.run_id,
            "status": outcome.status, "samples": outcome.samples_stored,
            "judgements": outcome.judgements_stored, "wall_s": wall, "generated_s": marks.get("generated"),
            "completion_tokens": tokens, "null_score_share": nulls, "max_tokens": max_tokens,
            "failures": list(outcome.failures)[:5]}


# ---------------------------------------------------------------------------
# lora-modules: where the LoRA time goes (LoRA layers on every module, rank 64)
# ---------------------------------------------------------------------------

def phase_lora_modules(root: Path) -> dict:
    from backend.conditions import Condition, ConditionRunner
    from backend.serving import start_server, stop_server

    p = paths(root)
    config = make_config(root, adapters={"em": p["em"], "em-rank32": p["rank32"]}, lora_target_modules="all",
                         name="config-lora-all", port=8766)
    state = start_server(config)
    try:
        runner = ConditionRunner(config)
        em_name = runner.served_model(Condition(adapter="em"))
        base_name = runner.client.served_name(runner.served_model(Condition()))
        table = decode_table(state.url, {"base": [base_name], "EM": [em_name]}, concurrencies=LORA_CONCURRENCY,
                             runs=1)
    finally:
        stop_server(config)
    return {"max_lora_rank": state.max_lora_rank, "lora_target_modules": "all", "decode": table}


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

def model_bytes(shape_name: str) -> tuple[int, int, dict]:
    """(bytes of all weights, bytes a decode step reads, sizes) of a PAPER_SHAPES model in bf16,
    counted on the meta device (no weights needed, so the report can be made anywhere). A step
    reads one row of an untied input embedding, so that table is left out of the step's bytes."""
    from dataclasses import asdict

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from backend.testmodels import PAPER_SHAPES
    sizes = asdict(PAPER_SHAPES[shape_name])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    total = 2 * sum(parameter.numel() for parameter in model.parameters())
    embedding = 2 * model.model.embed_tokens.weight.numel()
    return total, total - (0 if sizes["tie_word_embeddings"] else embedding), sizes


def phase_report(root: Path, out: Path, limits_path: Path | None) -> str:
    p = paths(root)
    results = {f.stem: json.loads(f.read_text()) for f in sorted(p["results"].glob("*.json"))}
    limits = json.loads(limits_path.read_text()) if limits_path and limits_path.exists() else results.get("limits", {})
    all_weights, weights, cfg = model_bytes(SHAPE)
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (
        cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    bandwidth = limits.get("read_bandwidth_gbs", 0) * 1e9
    tflops = limits.get("bf16_matmul_tflops", 0) * 1e12
    params = all_weights / 2
    lines = [f"# GPU benchmark: random {SHAPE} shape ({params / 1e9:.2f} B parameters, bf16)", "",
             f"Hardware: {limits.get('gpu', '?')}; measured in the same session: HBM read {limits.get('read_bandwidth_gbs')} GB/s, "
             f"copy {limits.get('copy_bandwidth_gbs')} GB/s, bf16 matmul {limits.get('bf16_matmul_tflops')} TFLOP/s "
             f"(bench/gpu_limits.py); torch {limits.get('torch')}; vLLM 0.26.0 (scripts/wheelhouse.py); "
             f"{time.strftime('%Y-%m-%d')}.", ""]
    serve = results.get("serve", {})
    if serve:
        lines += [f"Server: `python -m backend serve` path (backend.serving.start_server), max-lora-rank "
                  f"{serve['max_lora_rank']}, max-loras {serve['max_loras']}, LoRA layers on "
                  f"{', '.join(serve['lora_target_modules'] or ['every linear module'])}; started in {serve['startup_s']:.0f} s.", "",
                  f"## Decode throughput (output tokens/s, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
                  f"median of {RUNS} runs; in brackets: share of the HBM bound for that batch (weights + KV read "
                  f"once per step) / share of the roofline (the larger of that time and the step's matmul FLOPs at "
                  f"the measured bf16 rate))", "",
                  "| case | " + " | ".join(f"x{c}" for c in CONCURRENCY) + " |",
                  "|---|" + "---|" * len(CONCURRENCY)]
        for case, row in serve["decode"].items():
            cells = []
            for c in CONCURRENCY:
                rate = row[str(c)]["median"]
                context = PROMPT_TOKENS + NEW_TOKENS / 2
                step_bytes = weights + c * context * kv_per_token
                bound = c / (step_bytes / bandwidth) if bandwidth else float("nan")
                step_flops = c * 2 * (weights / 2)  # every token through every decoder matrix and the LM head
                roofline = c / max(step_bytes / bandwidth, step_flops / tflops) if bandwidth and tflops else float("nan")
                cells.append(f"{rate:.0f} ({rate / bound:.0%} / {rate / roofline:.0%})")
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        decode = serve["decode"]
        em_vs_base = [decode["EM"][str(c)]["median"] / decode["base"][str(c)]["median"] for c in CONCURRENCY]
        abl_vs_em = [decode["EM + ablation"][str(c)]["median"] / decode["EM"][str(c)]["median"] for c in CONCURRENCY]
        bound1 = 1 / (weights / bandwidth) if bandwidth else float("nan")
        base1 = decode["base"]["1"]["median"]
        lines += ["", "| target | measured | met |", "|---|---|---|",
                  f"| EM + ablation >= 0.95 x EM at every concurrency | "
                  f"{', '.join(f'{x:.3f}' for x in abl_vs_em)} | {'yes' if min(abl_vs_em) >= 0.95 else 'no'} |",
                  f"| EM >= 0.9 x base at every concurrency | {', '.join(f'{x:.3f}' for x in em_vs_base)} | "
                  f"{'yes' if min(em_vs_base) >= 0.9 else 'no'} |",
                  f"| base at batch 1 >= 80 % of the HBM bound ({bound1:.1f} tok/s: {weights / 1e9:.2f} GB of weights "
                  f"read per step, the input embedding's table aside) | {base1:.1f} tok/s = {base1 / bound1:.0%} | "
                  f"{'yes' if base1 / bound1 >= 0.8 else 'no'} |"]
        reference = results.get("reference", {})
        if reference:
            ratios = [decode["EM + ablation"][str(c)]["median"] / reference["speed"][str(c)]["tokens_per_s"]
                      for c in CONCURRENCY]
            lines.append("| served ablation >= 10 x the hook engine (transformers, same ablation, same batch) | "
                         + ", ".join(f"x{c}: {r:.1f}x ({reference['speed'][str(c)]['tokens_per_s']:.0f} tok/s)"
                                     for c, r in zip(CONCURRENCY, ratios))
                         + f" | {'yes' if min(ratios) >= 10 else 'no'} |")
        slider = serve["slider"]["first_token_s"]
        p50, p95 = statistics.median(slider), percentile(slider, 95)
        lines.append(f"| slider: new strength -> first token p50 <= 300 ms ({len(slider)} trials) | "
                     f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (adapter build + write + load alone: p50 "
                     f"{statistics.median(serve['slider']['served_s']) * 1000:.0f} ms) | {'yes' if p50 <= 0.3 else 'no'} |")
        correctness = serve["correctness"]
        gaps = correctness["served_vs_reference_max_abs"]
        lines.append(f"| compiled ablation matches the hook reference in bf16 (max abs d logprob, 3 prompts) | "
                     f"EM + ablation {gaps['em_ablated']:.4f}; for scale: base {gaps['base']:.4f}, EM {gaps['em']:.4f} "
                     f"(engine-to-engine bf16 difference with no ablation); ablation's own effect "
                     f"{correctness['ablation_effect_max_abs']:.3f} | "
                     + ("yes" if gaps["em_ablated"] <= correctness["tolerance"] else
                        f"no against {correctness['tolerance']}; "
                        + ("within 1.5 x the no-ablation floor" if gaps["em_ablated"] <= 1.5 * max(gaps["base"], gaps["em"])
                           else "above 1.5 x the no-ablation floor")) + " |")
        # Prefill runs every layer on every prompt token but the LM head on the last one only.
        vocab_params = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2)
        flops_per_token = 2 * (params - vocab_params)
        # Before distinct_rounds, every round sent the same prompts: rounds 2 and 3 were prefix-cache
        # hits, and only the first round measured prefill.
        distinct = serve["prefill"].get("distinct_rounds")
        prefill = serve["prefill"]["median"] if distinct else serve["prefill"]["runs"][0]["tokens_per_s"]
        which = ("median of the rounds" if distinct else
                 "first round; the later rounds repeated its prompts and were prefix-cache hits")
        lines += ["", f"Prefill: {prefill:.0f} prompt tokens/s ({which}, {serve['prefill']['concurrency']} prompts of "
                  f"{serve['prefill']['prompt_tokens']} tokens at once, base) = {prefill * flops_per_token / 1e12:.0f} "
                  f"TFLOP/s of weight matmuls, {prefill * flops_per_token / tflops:.0%} of the measured bf16 matmul rate "
                  "(2 x the parameters of the decoder layers per token; attention's own FLOPs not counted)."]
    lora = results.get("lora-modules")
    if lora and serve:
        lines += ["", "## Where the LoRA time goes: the same server with LoRA layers on every linear module "
                  f"(max-lora-rank {lora['max_lora_rank']}, as needed for the rank-32 adapter), 1 run each", "",
                  "| case | " + " | ".join(f"x{c}" for c in LORA_CONCURRENCY) + " |",
                  "|---|" + "---|" * len(LORA_CONCURRENCY)]
        for case in ("base", "EM"):
            lines.append(f"| {case}, LoRA on every module | " + " | ".join(
                f"{lora['decode'][case][str(c)]['median']:.0f}" for c in LORA_CONCURRENCY) + " |")
            lines.append(f"| {case}, LoRA on {', '.join(serve['lora_target_modules'] or ['all'])} only | " + " | ".join(
                f"{serve['decode'][case][str(c)]['median']:.0f}" for c in LORA_CONCURRENCY) + " |")
    evaluation = results.get("eval")
    if evaluation:
        lines += ["", "## Full evaluation (8 questions x 100 samples x 3 conditions: base, EM, EM + ablation; "
                  f"up to {evaluation['max_tokens']} new tokens; judged aligned + coherent by the same server's base)", "",
                  f"{evaluation['samples']} samples and {evaluation['judgements']} judgements stored in "
                  f"{evaluation['wall_s']:.0f} s: {evaluation['samples'] / evaluation['wall_s']:.1f} judged samples/s; "
                  f"all samples generated after {evaluation['generated_s'] or float('nan'):.0f} s; "
                  f"{evaluation['completion_tokens'] or 0} output tokens; status {evaluation['status']}; null scores "
                  f"{evaluation['null_score_share'] or 0:.0%} (a random judge puts little mass on numbers)."]
    build = results.get("build")
    if build:
        lines += ["", f"Build of the random model and adapters on the host: {build['seconds']:.0f} s."]
    if results.get("reference"):
        lines.append(f"Reference engine load (transformers, bf16): {results['reference']['load_s']:.0f} s.")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/root/em-gpu"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu-h100.md"))
    parser.add_argument("--limits", type=Path, help="JSON from bench/gpu_limits.py (default: measure now)")
    parser.add_argument("--slider-trials", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=600, help="eval: new tokens per answer at most")
    parser.add_argument("phase", choices=["limits", "build", "reference", "serve", "eval", "lora-modules", "report"])
    parser.add_argument("--keep-server", action="store_true", help="serve: leave the server running for eval")
    parser.add_argument("--deadline-s", type=float, help="eval: cancel the run after this many seconds")
    parser.add_argument("--end-by", type=float, help="eval: cancel the run at this time (epoch seconds) at the latest")
    parser.add_argument("--smoke", action="store_true", help="0.5B shape, tiny counts: a CPU check of the script")
    args = parser.parse_args()
    root = args.root
    if args.smoke:
        global SHAPE, CONCURRENCY, LORA_CONCURRENCY, NEW_TOKENS, RUNS, SMOKE, EVAL_SAMPLES
        SHAPE, CONCURRENCY, LORA_CONCURRENCY, NEW_TOKENS, RUNS, SMOKE, EVAL_SAMPLES = (
            "qwen2.5-0.5b", (1, 2), (1, 2), 4, 1, True, 1)
    if args.phase == "limits":
        from gpu_limits import measure
        save(root, "limits", measure())
    elif args.phase == "build":
        result = phase_build(root)
        save(root, "build", result)
        print(json.dumps(result), flush=True)
    elif args.phase == "reference":
        save(root, "reference", phase_reference(root))
    elif args.phase == "serve":
        save(root, "serve", phase_serve(root, args.slider_trials, args.keep_server))
    elif args.phase == "eval":
        result = phase_eval(root, args.max_tokens, args.deadline_s, args.end_by)
        save(root, "eval", result)
        print(json.dumps(result), flush=True)
    elif args.phase == "lora-modules":
        save(root, "lora-modules", phase_lora_modules(root))
    else:
        print(phase_report(root, args.out, args.limits))


if __name__ == "__main__":
    main()
