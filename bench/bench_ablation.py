"""Benchmark: new strength -> ablation adapter written (cold, warm), optional load into a
running server, and activation extraction throughput.

    .venv/bin/python bench/bench_ablation.py [--models DIR] [--repeats 20] [--serve]

Cold = a fresh AblationCompiler and an empty cache (reads r^T W from the base
weights); warm = the same compiler, a strength never built before (only the
last column of B' and the files change); reuse = a strength already on disk.
--serve also starts a vLLM server (CPU: ~1 min) and times build + write + load.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.ablation import AblationCompiler  # noqa: E402
from backend.activations import Example, answer_activation_sums, load_model  # noqa: E402
from backend.directions import BaseModelInfo, Direction  # noqa: E402
from backend.testmodels import _WORDS, build_test_suite  # noqa: E402


def ms(values: list[float]) -> str:
    values = sorted(v * 1000 for v in values)
    return f"median {statistics.median(values):7.1f} ms  p90 {values[int(0.9 * (len(values) - 1))]:7.1f} ms  (n={len(values)})"


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(_WORDS) for _ in range(k))
    return [Example(sentence(8) + "?", sentence(rng.randint(40, 120)) + ".") for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=None, help="folder for the test models (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--serve", action="store_true")
    args = parser.parse_args()

    models = build_test_suite(Path(args.models or tempfile.mkdtemp(prefix="bench-models-")))
    base = BaseModelInfo.from_path(models["base"])
    model, tokenizer = load_model(models["base"])
    rows = []
    for batch_size in (1, 8, 32):
        # The first passes at a shape are several times slower (allocator, kernels): warm up.
        answer_activation_sums(model, tokenizer, examples(batch_size * 2, seed=1), batch_size=batch_size)
        stats = answer_activation_sums(model, tokenizer, examples(args.examples), batch_size=batch_size)
        rows.append((f"extraction, base, batch {batch_size}",
                     f"{stats.tokens_per_s:9.0f} answer tokens/s  ({stats.tokens} tokens, {stats.seconds:.2f} s)"))
    direction = Direction("bench", answer_activation_sums(model, tokenizer, examples(8)).mean(), base.path,
                          base.fingerprint)

    for name in ("base", "em-rank1", "em-rank8"):
        adapter = None if name == "base" else models[name]
        cold, warm, reuse = [], [], []
        for i in range(max(3, args.repeats // 4)):
            with tempfile.TemporaryDirectory() as cache:
                cold.append(AblationCompiler(cache).build(models["base"], direction, 2, 1.0, adapter).seconds)
        with tempfile.TemporaryDirectory() as cache:
            compiler = AblationCompiler(cache, max_adapters=1000)
            compiler.build(models["base"], direction, 2, 1.0, adapter)
            for i in range(args.repeats):
                warm.append(compiler.build(models["base"], direction, 2, -1 + 2.5 * (i + 1) / (args.repeats + 1),
                                           adapter).seconds)
                reuse.append(compiler.build(models["base"], direction, 2, 1.0, adapter).seconds)
        rows += [(f"{name}: new strength, cold", ms(cold)), (f"{name}: new strength, warm", ms(warm)),
                 (f"{name}: strength on disk", ms(reuse))]

    if args.serve:
        rows += serve_rows(models, direction, args.repeats)

    width = max(len(label) for label, _ in rows)
    print(f"\n{'case':<{width}}  result")
    print("-" * (width + 60))
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


def serve_rows(models, direction, repeats: int):
    from tests.conftest import free_port, write_config
    from backend.adapters import AdapterRegistry
    from backend.serving import start_server, stop_server

    folder = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    config = write_config(folder, models["base"], {"em-rank1": models["em-rank1"]}, free_port())
    start_server(config)
    try:
        registry = AdapterRegistry(config)
        compiler = AblationCompiler(config.cache, max_adapters=1000)
        compiler.build(models["base"], direction, 2, 1.0, models["em-rank1"])  # warm the compiler
        total, load = [], []
        for i in range(repeats):
            start = time.perf_counter()
            built = compiler.build(models["base"], direction, 2, -1 + 2.5 * (i + 1) / (repeats + 1), models["em-rank1"])
            loaded = time.perf_counter()
            registry.load(built.served_name, str(built.path))
            total.append(time.perf_counter() - start)
            load.append(time.perf_counter() - loaded)
            registry.unload(built.served_name)
        return [("em-rank1: new strength -> served (build+write+load)", ms(total)),
                ("em-rank1: of which load into vLLM", ms(load))]
    finally:
        stop_server(config)


if __name__ == "__main__":
    main()
