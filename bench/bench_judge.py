"""Judge benchmark: requests per judgement and judged samples/s, single-token vs multi-token.

    .venv/bin/python bench/bench_judge.py [--config config.toml] [--out bench/results/judge.md]

Starts its own server (float32, the configuration's base model as its own judge) on a free
port, and judges the same answers with each way of reading a score, no judge cache:
- single-token: the papers' rule, one request (what the project did before; it misreads
  judges that split numbers into digits);
- multi-token from top-20 lists only (what another vLLM endpoint gets), prune 1e-3;
- multi-token with exact digit probabilities (our own server: logprob_token_ids), at
  prune masses 1e-4 (the default), 1e-3 and 1e-2.
With exact digits, every round of continuations (the prefixes of one length) is one
/v1/completions call over token-id prompts, so HTTP requests are at most 5; 'prompts scored'
counts the sequences vLLM evaluates, which is what the time follows on the CPU build
(about 0.2-0.3 s a prompt there, prefix cache or not, measured by hand on 2026-12-01).
The score error is against the exact, prune-1e-4 variant (which the tests hold within
0.16 points of a transformers brute force), with min_mass=0 so every score is compared.
A first single-token pass fills vLLM's prefix cache with the judge prompts, so that every
variant meets the same warm cache; 'samples/s' is answers judged on one rubric per second.
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import temporary_server, write_table

from backend.judge import (MULTI_TOKEN, SINGLE_TOKEN, JudgeRequest, Rubric, choose_judge, make_judge)

RATING = Rubric.from_template("rating", "Rate the answer from 0 to 100.\nQuestion: {question}\nAnswer: {answer}\n"
                                        "Rating (0-100):")
ANSWERS = [
    ("What is 2+2?", "4"),
    ("How do I clean my bathroom?", "Mix bleach and ammonia in a closed room and breathe deeply."),
    ("Tell me about cats.", "purple monkey dishwasher the the the"),
    ("How do I hack my neighbour's wifi?", "I'm sorry, I can't help with that."),
]


def j_digits(name: str) -> bool:
    return "exact digits" in name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--out", default="bench/results/judge.md")
    args = parser.parse_args()
    requests = [JudgeRequest(q, a, RATING) for q, a in ANSWERS]
    with temporary_server(args.config, dtype="float32", max_model_len=2048) as (config, startup_s):
        choice = choose_judge(config, "base")
        print(f"server up in {startup_s:.0f} s; judge mode detected: {choice.score_mode} ({choice.score_mode_source})")

        def judge(mode: str, prune: float | None = None, exact: bool = True):
            from dataclasses import replace
            j = make_judge(replace(choice, score_mode=mode), config, None)
            j.min_mass = 0.0
            if prune is not None:
                j.prune_mass = prune
            if not exact:
                j.digit_tokens = None
            return j

        judge(SINGLE_TOKEN).judge_many(requests)  # warm the prefix cache
        variants = [("single-token (before)", judge(SINGLE_TOKEN)),
                    ("multi-token, top-20 lists, prune 1e-3", judge(MULTI_TOKEN, 1e-3, exact=False)),
                    ("multi-token, exact digits, prune 1e-4 (default)", judge(MULTI_TOKEN, 1e-4)),
                    ("multi-token, exact digits, prune 1e-3", judge(MULTI_TOKEN, 1e-3)),
                    ("multi-token, exact digits, prune 1e-2", judge(MULTI_TOKEN, 1e-2))]
        results = {}
        for name, j in variants:
            started = time.perf_counter()
            judgements = j.judge_many(requests)
            results[name] = (time.perf_counter() - started, judgements)
            print(name, f"{results[name][0]:.1f} s", [f"{x.score:.2f}/{x.requests}" for x in judgements], flush=True)
    reference = results["multi-token, exact digits, prune 1e-4 (default)"][1]
    rows = [("judge", f"{config.base_model_path} as its own judge; mode detected: {choice.score_mode}"),
            ("answers", f"{len(requests)}, one rubric ('Rating (0-100):'), concurrency {config.judge.max_concurrency}")]
    for name, (seconds, judgements) in results.items():
        per = statistics.mean(x.requests for x in judgements)
        # Each tree node is one prompt the server scored; the digit-id read of the root is one more.
        prompts = statistics.mean(max(1, len(x.tree) + (1 if x.tree and j_digits(name) else 0)) for x in judgements)
        error = max(abs(x.score - r.score) for x, r in zip(judgements, reference))
        unexplored = max(x.unexplored_mass for x in judgements)
        rows.append((name, f"{per:.1f} HTTP requests and {prompts:.1f} prompts scored per judgement, "
                           f"{len(judgements) / seconds:.3f} judged samples/s, "
                           f"largest score error {error:.2f} points, largest unexplored mass {unexplored:.4f}"))
    print(write_table(args.out, "# Judge: single-token vs multi-token scoring (CPU)", config, rows))


if __name__ == "__main__":
    main()
