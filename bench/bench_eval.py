"""Evaluation benchmark: judged samples per second, end to end, on this machine.

    .venv/bin/python bench/bench_eval.py [--config config.toml] [--samples 2] [--out bench/results/eval-cpu.md]

Starts its own server on a free port with a temporary cache (it never touches a running
one or the project's store), with the configuration's models, adapters and judge. Runs
the bundled em_core questions under base and every configured adapter, judged by the
configured judge, through the same `run_eval` the CLI and the dashboard use: generation,
store writes, judging and judgement writes all included. 'Judged samples/s' counts samples
that have all their scores, over the wall time of the run. Each variant uses its own seed
so the judge cache never answers for the judge.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.config import config_from_dict, load_config  # noqa: E402
from backend.evaluation import RunSpec, run_eval  # noqa: E402
from backend.serving import start_server, stop_server  # noqa: E402
from backend.store import Store  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--out", default="bench/results/eval-cpu.md")
    parser.add_argument("--questions", default="em_core")
    parser.add_argument("--samples", type=int, default=2, help="per paraphrase")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[300, 64])
    parser.add_argument("--judge-concurrency", type=int, nargs="+", default=[None, 32],
                        help="judge.max_concurrency per variant (first: the configured value)")
    args = parser.parse_args()

    source = load_config(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        data = source.model_dump(exclude={"root"})
        data["adapters"] = {name: source.adapter_path(name) for name in source.adapters}
        data["base_model"] = source.base_model_path
        data["cache_dir"] = cache
        data["server"] = {**data["server"], "port": free_port(), "url": ""}
        config = config_from_dict(data, Path(cache))
        store = Store(Path(cache) / "bench.duckdb")
        conditions = ("base", *(f"adapter={name}" for name in config.adapters))
        start_server(config)
        try:
            # Warm-up: the first LoRA batch and first judge calls compile kernels.
            run_eval(RunSpec(questions=args.questions, conditions=conditions, samples=1, max_tokens=8, seed=999,
                             run_id="warmup", question_ids=("one_wish",)), config=config, store=store)
            variants = [(t, c) for t in args.max_tokens for c in args.judge_concurrency[:1]]
            variants += [(args.max_tokens[0], c) for c in args.judge_concurrency[1:]]
            for index, (max_tokens, concurrency) in enumerate(variants):
                variant = config
                if concurrency is not None:
                    variant = config.model_copy(update={"judge": config.judge.model_copy(
                        update={"max_concurrency": concurrency})})
                spec = RunSpec(questions=args.questions, conditions=conditions, samples=args.samples,
                               max_tokens=max_tokens, seed=index, run_id=f"bench-{index}")
                marks: dict[str, float] = {}
                started = time.perf_counter()

                def progress(p, marks=marks, started=started):
                    if p.samples_done == p.samples_total and "generated" not in marks:
                        marks["generated"] = time.perf_counter() - started

                result = run_eval(spec, progress, config=variant, store=store)
                wall = time.perf_counter() - started
                tokens = store.sql("SELECT sum(completion_tokens) FROM samples WHERE run_id = ?",
                                   [spec.run_id]).rows[0][0]
                nulls = store.sql("SELECT avg((score IS NULL)::INT) FROM judgements WHERE run_id = ?",
                                  [spec.run_id]).rows[0][0]
                rows.append((max_tokens, variant.judge.max_concurrency, result.samples_total,
                             result.judgements_total, wall, marks.get("generated", wall), tokens, nulls, result.status))
        finally:
            stop_server(config)

    table = ["| max_tokens | judge concurrency | samples | judgements | wall s | judged samples/s | "
             "judgements/s | all samples stored after s | output tok/s (generation phase) | null scores | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for max_tokens, concurrency, samples, judgements, wall, generated, tokens, nulls, status in rows:
        table.append(f"| {max_tokens} | {concurrency} | {samples} | {judgements} | {wall:.1f} | {samples / wall:.2f} | "
                     f"{judgements / wall:.1f} | {generated:.1f} | {tokens / generated:.0f} | {nulls:.0%} | {status} |")
    header = (f"Config: {source.base_model_path} with adapters {', '.join(source.adapters) or 'none'}; judge "
              f"{source.judge.model or '?'} at {source.judge.base_url or 'the own server'}; questions "
              f"{args.questions} x {args.samples} samples per paraphrase under {', '.join(conditions)}; "
              f"{platform.machine()}, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    notes = ("Judged samples/s = samples with all their scores / wall time of the whole run (generation, judging "
             "and store writes overlap). The first row is the default configuration; the last varies only the "
             "judge's max_concurrency. The random tiny judge puts little mass on numbers, so most scores are null: "
             "the cost per judgement is the same as for real scores.")
    text = "\n".join([header, "", *table, "", notes, "", "Command: .venv/bin/python bench/bench_eval.py "
                      + " ".join(sys.argv[1:])])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
