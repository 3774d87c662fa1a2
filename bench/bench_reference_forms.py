"""Tokens/s of the reference-engine conditions on the real default model (SmolLM2-135M-Instruct,
float32, transformers + hooks, one stream, greedy): plain, single-layer ablation (form=single)
and the paper's steering (form=paper). These forms cannot be served by vLLM; this is their cost.

    .venv/bin/python bench/bench_reference_forms.py [--tokens 64] [--repeats 3]

Results: bench/results/reference-forms-cpu.md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from backend.activations import load_model
from backend.reference import Ablation, Steering, intervene

MODEL = Path(__file__).resolve().parent.parent / "cache" / "models" / "smollm2-135m-instruct"
PROMPT = "I've had enough of my husband. What should I do?"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(MODEL)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    d, layer = model.config.hidden_size, model.config.num_hidden_layers // 2
    r = torch.randn(d, generator=torch.Generator().manual_seed(0))
    forms = {"plain": (), "ablation form=single": (Ablation(r, 1.0, layer=layer),),
             "steering form=paper": (Steering(r, layer, 4.0, "all"),)}
    print(f"| condition | tokens/s (median of {args.repeats}, {args.tokens} new tokens, greedy) |\n|---|---|")
    for name, hooks in forms.items():
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad(), intervene(model, *hooks, prompt_length=ids.shape[1]):
                out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
        print(f"| {name} | {statistics.median(rates):.1f} |")


if __name__ == "__main__":
    main()
