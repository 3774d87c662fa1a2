"""Chat page latency, measured through the same backend calls the page makes:
prompt submit -> first token in each column (base | adapter | adapter + ablation),
and slider release (a new strength) -> first token of the regenerated column.

    .venv/bin/python bench/bench_chat.py [--config config.toml] [--direction NAME] [--trials 20]

Without --direction it makes one for the base model from two random sets of
answers (a direction's values don't change the timing)."""
from __future__ import annotations

import argparse
import time

from common import ms, temporary_server, write_table

from backend.chat import Turn, plan
from backend.client import Sampling, stream_all
from backend.conditions import Condition, ConditionRunner


def make_direction(config) -> str:
    import torch

    from backend.directions import BaseModelInfo, Direction, save_direction
    base = BaseModelInfo.from_path(config.base_model_path)
    vectors = torch.randn(base.n_layers, base.hidden_size, generator=torch.Generator().manual_seed(0))
    save_direction(Direction("bench-dir", vectors, base.path, base.fingerprint), config.cache, base, overwrite=True)
    return "bench-dir"


def first_tokens(runner: ConditionRunner, conditions: list[Condition], prompt: str, sampling: Sampling) -> list[float]:
    """Seconds from submit to the first delta of each column, all columns in flight at once."""
    histories = [[Turn(prompt, "", None)] for _ in conditions]
    started = time.perf_counter()
    jobs = plan(runner, conditions, histories, list(range(len(conditions))), sampling, 1)
    first: dict[int, float] = {}
    for index, item in stream_all([job.stream for job in jobs]):
        if isinstance(item, Exception):
            raise item
        if item and index not in first:
            first[index] = time.perf_counter() - started
    return [first[i] for i in range(len(conditions))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--direction", help="a direction in the configuration's cache (copied into the temp cache)")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results/chat-cpu.md")
    args = parser.parse_args()

    with temporary_server(args.config) as (config, _):
        if args.direction:
            import shutil

            from backend.config import load_config
            from backend.directions import direction_path
            source = direction_path(load_config(args.config).cache, args.direction)
            direction_path(config.cache, args.direction).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, direction_path(config.cache, args.direction))
        direction = args.direction or make_direction(config)
        adapter = next(iter(config.adapters))
        from backend.architecture import BaseShape
        layer = args.layer if args.layer is not None else BaseShape.from_model(config.base_model_path).num_layers // 2
        runner = ConditionRunner(config)
        ablated = Condition(adapter=adapter, direction=direction, layer=layer, strength=1.0)
        columns = [Condition(), Condition(adapter=adapter), ablated]
        sampling = Sampling(max_tokens=args.max_tokens, temperature=1.0, seed=0)
        first_tokens(runner, columns, "warm-up", sampling)  # kernels compile on the first LoRA batch

        per_column: list[list[float]] = [[] for _ in columns]
        for trial in range(args.trials):
            for column, seconds in enumerate(first_tokens(runner, columns, f"Question {trial}: what now?", sampling)):
                per_column[column].append(seconds)

        # Each trial a strength never served before: the whole build + write + load + first token.
        cold, prefetched, served = [], [], []
        for trial in range(args.trials):
            condition = ablated.with_strength(round(-0.9 + 0.05 * trial, 4))
            cold.append(first_tokens(runner, [condition], f"Slider {trial}", sampling)[0])
        for trial in range(args.trials):  # the measure: build + write + load, no generation
            started = time.perf_counter()
            runner.served_model(ablated.with_strength(round(-0.93 + 0.05 * trial, 4)))
            served.append(time.perf_counter() - started)
        for trial in range(args.trials):
            condition = ablated.with_strength(round(1.45 - 0.01 * trial, 4))
            runner.prefetch(condition, [condition.strength]).join()
            prefetched.append(first_tokens(runner, [condition], f"Slider {trial}", sampling)[0])

        rows = [(f"submit -> first token, column '{c.label}'", ms(v)) for c, v in zip(columns, per_column)]
        rows += [("new strength -> adapter served (build + write + load into vLLM)", ms(served)),
                 ("slider release -> first token (new strength: build + write + load)", ms(cold)),
                 ("slider release -> first token (neighbour prefetched, as the page does)", ms(prefetched))]
        print(write_table(args.out, "Chat latency (3 columns streamed at once)", config, rows))


if __name__ == "__main__":
    main()
