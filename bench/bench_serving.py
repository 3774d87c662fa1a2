"""Foundation benchmark: server cold start, adapter load/unload, streamed tokens/s.

    .venv/bin/python bench/bench_serving.py [--config config.toml] [--out bench/results/serving-cpu.md]
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import temporary_server, write_table

from backend.adapters import AdapterRegistry
from backend.client import ChatClient, ChatRequest, Sampling


def streamed_tokens_per_s(client: ChatClient, models: list[str], concurrency: int, max_tokens: int) -> float:
    """Output tokens/s over all streams; vLLM streams one token per delta."""
    requests = [ChatRequest(models[i % len(models)], ({"role": "user", "content": f"Tell me about risk number {i}."},),
                            Sampling(max_tokens=max_tokens, temperature=1.0, seed=i)) for i in range(concurrency)]
    deltas = 0
    started = time.perf_counter()
    for _, item in client.stream_many(requests):
        if isinstance(item, Exception):
            raise item
        if item is not None:
            deltas += 1
    return deltas / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--out", default="bench/results/serving-cpu.md")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    with temporary_server(args.config) as (config, cold_start):
        registry = AdapterRegistry(config)
        name = next(iter(config.adapters))
        loads, unloads = [], []
        for trial in range(args.trials):
            t0 = time.perf_counter()
            registry.load(f"bench-{trial}", config.adapter_path(name))
            t1 = time.perf_counter()
            registry.unload(f"bench-{trial}")
            unloads.append(time.perf_counter() - t1)
            loads.append(t1 - t0)
        for adapter in config.adapters:
            registry.load(adapter)
        client = ChatClient(config)
        models = ["base", *config.adapters][:3]
        streamed_tokens_per_s(client, models, 3, 8)  # the first LoRA batch compiles kernels
        single = streamed_tokens_per_s(client, ["base"], 1, args.max_tokens)
        single_lora = streamed_tokens_per_s(client, models[1:2] or ["base"], 1, args.max_tokens)
        twelve = streamed_tokens_per_s(client, models, 12, args.max_tokens)

        print(write_table(args.out, "Foundation: serving on this machine", config, [
            ("server cold start (start -> healthy)", f"{cold_start:.1f} s"),
            (f"adapter load ({name}), median of {args.trials}", f"{statistics.median(loads) * 1000:.0f} ms"),
            (f"adapter unload, median of {args.trials}", f"{statistics.median(unloads) * 1000:.0f} ms"),
            (f"1 stream, base, {args.max_tokens} tokens", f"{single:.1f} tok/s"),
            (f"1 stream, {models[1] if len(models) > 1 else 'base'}, {args.max_tokens} tokens",
             f"{single_lora:.1f} tok/s"),
            (f"12 streams over {', '.join(models)}, {args.max_tokens} tokens each",
             f"{twelve:.1f} tok/s (all streams)"),
        ]))


if __name__ == "__main__":
    main()
