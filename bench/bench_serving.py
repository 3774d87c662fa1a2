"""Foundation benchmark: server cold start, adapter load/unload, streamed tokens/s.

    .venv/bin/python bench/bench_serving.py [--config config.toml] [--out bench/results/serving-cpu.md]

Starts its own server on a free port with the given configuration's models
(it never touches a running one), and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.adapters import AdapterRegistry  # noqa: E402
from backend.client import ChatClient, ChatRequest, Sampling  # noqa: E402
from backend.config import config_from_dict, load_config  # noqa: E402
from backend.serving import start_server, stop_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def streamed_tokens_per_s(client: ChatClient, models: list[str], concurrency: int, max_tokens: int) -> float:
    """Output tokens/s over all streams; each streamed delta is one token in vLLM's streaming."""
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

    source = load_config(args.config)
    with tempfile.TemporaryDirectory() as cache:
        data = source.model_dump(exclude={"root"})
        data["adapters"] = {name: source.adapter_path(name) for name in source.adapters}
        data["base_model"] = source.base_model_path
        data["cache_dir"] = cache
        data["server"] = {**data["server"], "port": free_port(), "url": ""}
        config = config_from_dict(data, Path(cache))

        started = time.perf_counter()
        start_server(config)
        cold_start = time.perf_counter() - started
        try:
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
        finally:
            stop_server(config)

    rows = [
        ("server cold start (start -> healthy)", f"{cold_start:.1f} s"),
        (f"adapter load ({name}), median of {args.trials}", f"{statistics.median(loads) * 1000:.0f} ms"),
        (f"adapter unload, median of {args.trials}", f"{statistics.median(unloads) * 1000:.0f} ms"),
        (f"1 stream, base, {args.max_tokens} tokens", f"{single:.1f} tok/s"),
        (f"1 stream, {models[1] if len(models) > 1 else 'base'}, {args.max_tokens} tokens", f"{single_lora:.1f} tok/s"),
        (f"12 streams over {', '.join(models)}, {args.max_tokens} tokens each", f"{twelve:.1f} tok/s (all streams)"),
    ]
    table = ["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    header = (f"Config: {source.base_model_path}; {platform.machine()}, {os.cpu_count()} cores; "
              f"load average before: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    text = "\n".join([header, "", *table, "", "Command: .venv/bin/python bench/bench_serving.py "
                      + " ".join(sys.argv[1:])])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
