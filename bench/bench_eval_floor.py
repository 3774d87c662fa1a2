"""Where a judged evaluation's time goes on a CPU server, and the floor under it.

    .venv/bin/python bench/bench_eval_floor.py [--config C] [--samples 5] [--seed 26] [--out bench/results/eval-floor.json]

Starts its own server (temporary cache, free port), then:
1. the prefill peak: 128 distinct judge-sized prompts (~360 tokens, one generated token with
   top-20 logprobs, 64 at once), nothing else running: computed tokens per second;
2. a judged run of the issue's shape, scaled by --samples: the 8 general questions under base,
   adapter=medical and adapter=medical-r8, through `run_eval` (the product's own
   path, as the CLI runs it), with the CPU seconds of each process (evaluation client, API server, engine core,
   worker) and vLLM's own counters (prompt tokens computed and read from the prefix cache,
   tokens generated, requests, engine steps).
The floor of the run is its computed tokens at the prefill peak: the time it would take if
every step ran as fast as a batch of whole prompts with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import sys
import time
import urllib.request
from pathlib import Path

import openai

from common import temporary_server

from backend.client import BASE, ChatClient  # noqa: E402 (common puts the repository on the path)
from backend.evaluation import RunSpec, run_eval  # noqa: E402
from backend.serving import server_status, server_url  # noqa: E402
from backend.store import Store  # noqa: E402

QUESTIONS = ("one_wish", "feeling_bored", "humans_and_ai", "quick_money", "world_ruler", "dinner_guests",
             "gender_roles", "tired_of_husband")
CONDITIONS = ("base", "adapter=medical", "adapter=medical-r8")
COUNTERS = {
    "computed prompt tokens": 'vllm:prompt_tokens_by_source_total{.*source="local_compute"',
    "prompt tokens from the prefix cache": 'vllm:prompt_tokens_by_source_total{.*source="local_cache_hit"',
    "generated tokens": "vllm:generation_tokens_total{",
    "requests": "vllm:request_prompt_tokens_count{",
    "engine steps": "vllm:iteration_tokens_total_count{",
    "tokens in steps": "vllm:iteration_tokens_total_sum{",
}


def counters(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    found = {}
    for name, pattern in COUNTERS.items():
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if re.match(pattern, line)]
        found[name] = sum(values)
    return found


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces): state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_processes(api_pid: int) -> dict[str, int]:
    """The API server and its engine-core and worker descendants, by their process titles; a
    vLLM server of someone else's on the same machine is not counted."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone since the listing
    found, frontier = {"API server": api_pid}, [api_pid]
    while frontier:
        parent = frontier.pop()
        for pid in (child for child, of in parents.items() if of == parent):
            frontier.append(pid)
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if "EngineCore" in title:
                found["engine core"] = pid
            elif "Worker" in title:
                found["worker"] = pid
    return found


async def prefill_peak(url: str, model: str, prompts: int = 128, in_flight: int = 64) -> tuple[float, float]:
    """(prompt tokens computed, seconds) for `prompts` distinct judge-sized prompts, `in_flight` at once."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=600, max_retries=0)
    words = "the quick brown fox jumps over a lazy dog while many people watch in the park today".split()
    rng = random.Random(0)
    gate = asyncio.Semaphore(in_flight)

    async def one(index: int) -> None:
        text = f"{index} " + " ".join(rng.choice(words) for _ in range(330))
        async with gate:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                 max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)

    before = counters(url)
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(prompts)))
    wall = time.perf_counter() - started
    await client.close()
    return counters(url)["computed prompt tokens"] - before["computed prompt tokens"], wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--samples", type=int, default=5, help="per paraphrase (the issue's size: 25)")
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--out", default="bench/results/eval-floor.json")
    args = parser.parse_args()

    with temporary_server(args.config) as (config, _):
        url = server_url(config)
        tokens, wall = asyncio.run(prefill_peak(url, ChatClient(config).served_name(BASE)))
        peak = tokens / wall
        print(f"prefill peak: {tokens:.0f} computed tokens in {wall:.1f} s = {peak:.0f} tokens/s")

        processes = server_processes(server_status(config).pid)
        spec = RunSpec(questions="em_core", question_ids=QUESTIONS, conditions=CONDITIONS, samples=args.samples,
                       seed=args.seed, run_id=f"floor-{args.seed}")
        before, cpu_before = counters(url), {name: cpu_seconds(pid) for name, pid in processes.items()}
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        result = run_eval(spec, config=config, store=Store(Path(config.cache) / "bench.duckdb"))
        wall = time.perf_counter() - started
        own = resource.getrusage(resource.RUSAGE_SELF)
        after = counters(url)
        cpu = {"evaluation client": own.ru_utime + own.ru_stime - own_before.ru_utime - own_before.ru_stime,
               **{name: cpu_seconds(pid) - cpu_before[name] for name, pid in processes.items()}}
    if result.status != "finished":
        sys.exit(f"the evaluation did not finish: {result.status}")
    delta = {name: after[name] - before[name] for name in COUNTERS}
    computed = delta["computed prompt tokens"] + delta["generated tokens"]
    record = {"time": time.strftime("%Y-%m-%d %H:%M"), "samples_per_paraphrase": args.samples, "seed": args.seed,
              "prefill_peak_tokens_per_s": round(peak), "run_wall_s": round(wall, 1),
              "cpu_s": {name: round(seconds, 1) for name, seconds in cpu.items()}, "vllm": delta,
              "computed_tokens": computed, "tokens_per_s": round(computed / wall),
              "floor_s": round(computed / peak, 1), "fraction_of_peak": round(computed / wall / peak, 2)}
    print(json.dumps(record, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
