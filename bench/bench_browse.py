"""Filter-change latency of the Evaluations page's queries (backend.browse.browse) on synthetic
stores of 10k, 100k and 1M judged samples; writes bench/results/browse-cpu.md.

    python bench/bench_browse.py [--sizes 10000 100000 1000000] [--repeats 3] [--folder /tmp/em-bench]

One measurement = one call of browse(): open the store read-only under the shared lock (a
fresh DuckDB connection, as the page does every time: the store holds no connection), build
the filtered view, and compute the totals, the five chart aggregates and the 500-row sample
page. Streamlit's cache is not involved (every filter set is new to it). A scenario's p50/p95
are over its repeats; 'all' pools every scenario. The machine is shared: the load average is
recorded with the numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backend.browse import Filters, browse, filter_options  # noqa: E402
from backend.store import Store  # noqa: E402
from make_synthetic_store import make_store  # noqa: E402

# Filter changes a researcher makes, from broad to narrow; 'order' changes the table sort.
SCENARIOS: list[tuple[str, Filters, str, str]] = [
    ("everything (Turner)", Filters(), "turner2025", "key"),
    ("everything (Betley)", Filters(), "betley2025", "key"),
    ("one adapter", Filters(adapters=("em-medical",)), "turner2025", "key"),
    ("adapter x direction x strength", Filters(adapters=("em-sports",), directions=("dir-em-medical",),
                                               strengths=(0.5, 1.0)), "turner2025", "key"),
    ("not ablated, 2 questions", Filters(directions=("none",), questions=("ruler", "bored")), "betley2025", "key"),
    ("one run, score ranges", Filters(runs=("run-1",), aligned=(0, 40), coherent=(50, 100)), "turner2025",
     "most misaligned first"),
    ("misaligned only", Filters(misaligned_only=True), "turner2025", "most misaligned first"),
    ("finish reason = stop (95 %)", Filters(finish_reasons=("stop",)), "turner2025", "key"),
    ("finish reason = length (5 %)", Filters(finish_reasons=("length",)), "turner2025", "key"),
    ("text search 'meme coin'", Filters(search="meme coin"), "turner2025", "key"),
    ("text search, rare", Filters(search="double the dose", adapters=("base",)), "turner2025", "key"),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/em-bench")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "browse-cpu.md"))
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Browse latency on the CPU machine", "",
             f"`python bench/bench_browse.py --sizes {' '.join(map(str, args.sizes))} --repeats {args.repeats}` "
             f"on {platform.node()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "One sample = one `backend.browse.browse()` call = everything a filter change on the Evaluations "
             "page queries (fresh read-only connection under the store's shared lock, filtered view, totals, "
             "five chart aggregates, 500-row sample page). Seconds.", ""]
    summary = ["| samples | store build s | file MB | filter options s | p50 all | p95 all | max | load avg (1 min) |",
               "|---|---|---|---|---|---|---|---|"]
    detail = ["| samples | scenario | matched | p50 | p95 |", "|---|---|---|---|---|"]
    for size in args.sizes:
        path = folder / f"synthetic-{size}.duckdb"
        start = time.perf_counter()
        if path.exists() and Store(path).sql("SELECT count(*) FROM samples").rows[0][0] == size:
            store, built = Store(path), "reused"
        else:
            store = make_store(path, size, directions=False)
            built = f"{time.perf_counter() - start:.1f}"
        Store(path).migrate()
        start = time.perf_counter()
        filter_options(store)
        options_s = time.perf_counter() - start
        pooled = []
        loads = []
        for name, filters, definition, order in SCENARIOS:
            times = []
            matched = 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = browse(store, filters, definition, order=order)
                times.append(time.perf_counter() - start)
                matched = int(result.totals["samples"])
            loads.append(os.getloadavg()[0])
            pooled += times
            detail.append(f"| {size:,} | {name} | {matched:,} | {percentile(times, .5):.3f} | "
                          f"{percentile(times, .95):.3f} |")
            print(f"{size:>9,} {name:<34} {matched:>9,} p50 {percentile(times, .5):.3f} "
                  f"p95 {percentile(times, .95):.3f}", flush=True)
        summary.append(f"| {size:,} | {built} | {path.stat().st_size / 2**20:.0f} | {options_s:.3f} | "
                       f"{percentile(pooled, .5):.3f} | {percentile(pooled, .95):.3f} | {max(pooled):.3f} | "
                       f"{min(loads):.1f}–{max(loads):.1f} |")
    lines += summary + ["", "Per scenario:", ""] + detail + [""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
