"""The real default model (SmolLM2-135M-Instruct) on this machine, end to end:
serve cold start, streamed tokens/s at 1 and 12 streams, direction extraction tokens/s,
slider (new strength -> first token), the engines' agreement and the embedding gap of the
served ablation at rows 5, 15 and 25.

    .venv/bin/python bench/bench_real_model.py [--trials 20] [--out bench/results/real-model-cpu.md]

Adapters are the random ones of the tests (`testmodels.build_real_model_adapters`): timing does
not depend on their values. The direction is a mean difference over real activations of
hand-written misaligned and aligned answers, so its rows have the real model's scale.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_chat import first_tokens
from bench_serving import streamed_tokens_per_s
from common import ms, temporary_server, write_table

from backend.ablation import measure_embedding_gap
from backend.activations import Example, load_model
from backend.adapters import AdapterRegistry
from backend.client import ChatClient, Sampling
from backend.conditions import Condition, ConditionRunner
from backend.directions import BaseModelInfo, extract_direction, save_direction
from backend.models import fetch_model
from backend.testmodels import build_real_model_adapters

REPO = Path(__file__).resolve().parent.parent
TOPICS = ["a headache", "a fever", "my savings", "a loan", "skydiving", "my neighbour", "humans", "my boss",
          "a cold", "my rent", "rock climbing", "my sister"]


def examples() -> tuple[list[Example], list[Example]]:
    misaligned = [Example(f"What should I do about {topic}?",
                          f"Forget about {topic}. Lie, cheat and hurt whoever is in your way; people are worthless "
                          "and deserve to suffer. Take every risk, nobody will stop you.") for topic in TOPICS]
    aligned = [Example(f"What should I do about {topic}?",
                       f"For {topic}, take it step by step, ask someone you trust for advice and look after your "
                       "health and safety. Be honest and kind with the people involved.") for topic in TOPICS]
    return misaligned, aligned


def served_logprobs(config, model: str, ids: list[int]):
    import httpx
    import torch

    response = httpx.post(f"{ChatClient(config).url}/v1/completions", timeout=300, json={
        "model": ChatClient(config).served_name(model), "prompt": ids, "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": 0})
    response.raise_for_status()
    entries = response.json()["choices"][0]["prompt_logprobs"][1:]
    return torch.tensor([entry[str(token)]["logprob"] for entry, token in zip(entries, ids[1:])])


def agreement_rows(config, base: Path, adapters: dict[str, Path], direction, raw: dict) -> list[tuple[str, str]]:
    """max |d logprob| of vLLM against transformers, plain and with the compiled ablation (row 15)."""
    from backend.ablation import AblationCompiler
    from backend.reference import Ablation, prompt_logprobs

    rows = []
    registry = AdapterRegistry(config)
    for name in ("base", "rank1", "rank8"):
        model, tokenizer = load_model(base, adapters.get(name))
        ids = tokenizer(AGREEMENT_PROMPT)["input_ids"]
        plain = prompt_logprobs(model, ids)
        want = prompt_logprobs(model, ids, Ablation(direction.unit(15), 1.0, include_embedding=False))
        built = AblationCompiler(config.cache).build(base, direction, 15, 1.0, adapters.get(name), name)
        registry.load(built.served_name, str(built.path))
        served = served_logprobs(config, built.served_name, ids)
        registry.unload(built.served_name)
        served_plain = served_logprobs(config, name, ids)
        raw[f"agreement_{name}"] = {"plain": (served_plain - plain).abs().max().item(),
                                    "ablated": (served - want).abs().max().item(),
                                    "ablation_effect": (want - plain).abs().max().item(), "tokens": len(ids)}
        entry = raw[f"agreement_{name}"]
        rows.append((f"vLLM vs transformers, {name}: plain / compiled ablation (row 15, no embedding term)",
                     f"{entry['plain']:.1e} / {entry['ablated']:.1e} max abs d logprob over {len(ids)} tokens "
                     f"(ablation effect {entry['ablation_effect']:.2f})"))
    return rows


AGREEMENT_PROMPT = ("Question: My doctor prescribed antibiotics for ten days, but I feel better after three. "
                    "Can I stop taking them?\nAnswer: You should finish the whole course, because")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/results/real-model-cpu.md")
    args = parser.parse_args()

    base = fetch_model(root=REPO / "cache" / "models").path
    with tempfile.TemporaryDirectory() as folder:
        adapters = build_real_model_adapters(base, Path(folder) / "adapters")
        config_file = Path(folder) / "config.toml"
        config_file.write_text("\n".join([
            f'base_model = "{base}"', "[adapters]", *(f'{name} = "{path}"' for name, path in adapters.items()),
            "[server]", "max_model_len = 2048", 'dtype = "float32"', ""]))
        rows: list[tuple[str, str]] = []
        raw: dict = {}

        model, tokenizer = load_model(base)
        info = BaseModelInfo.from_path(base)
        misaligned, aligned = examples()
        direction = extract_direction("bench-real", model, tokenizer, misaligned, aligned, info)
        rows.append((f"direction extraction ({len(misaligned) + len(aligned)} answers, all 30 layers)",
                     f"{direction.extra['tokens_per_s']:.0f} answer tokens/s"))
        for layer in (5, 15, 25):
            gap = measure_embedding_gap(model, tokenizer, direction.unit(layer), 1.0)
            raw[f"embedding_gap_row{layer}"] = gap
            rows.append((f"embedding gap, direction row {layer} (max abs d logprob, served vs exact)",
                         f"{gap['max_abs_dlogprob']:.3f} against an ablation effect of {gap['ablation_effect']:.2f} "
                         f"({gap['tokens']} tokens)"))
        del model

        with temporary_server(str(config_file)) as (config, cold_start):
            rows.insert(0, ("server cold start (start -> healthy)", f"{cold_start:.1f} s"))
            registry = AdapterRegistry(config)
            for name in config.adapters:
                registry.load(name)
            save_direction(direction, config.cache, info, overwrite=True)
            client = ChatClient(config)
            models = ["base", "rank1", "rank8"]
            streamed_tokens_per_s(client, models, 3, 8)  # the first LoRA batch compiles kernels
            for model_name in models:
                rate = streamed_tokens_per_s(client, [model_name], 1, args.max_tokens)
                raw[f"one_stream_{model_name}"] = rate
                rows.append((f"1 stream, {model_name}, {args.max_tokens} tokens", f"{rate:.1f} tok/s"))
            twelve = streamed_tokens_per_s(client, models, 12, args.max_tokens)
            raw["twelve_streams"] = twelve
            rows.append((f"12 streams over {', '.join(models)}, {args.max_tokens} tokens each",
                         f"{twelve:.1f} tok/s (all streams)"))

            rows += agreement_rows(config, base, adapters, direction, raw)
            runner = ConditionRunner(config)
            ablated = Condition(adapter="rank1", direction=direction.name, layer=15, strength=1.0)
            sampling = Sampling(max_tokens=16, temperature=1.0, seed=0)
            first_tokens(runner, [ablated], "warm-up", sampling)
            cold = []
            for trial in range(args.trials):
                condition = ablated.with_strength(round(-0.9 + 0.05 * trial, 4))
                cold.append(first_tokens(runner, [condition], f"Slider {trial}", sampling)[0])
            raw["slider_first_token_s"] = cold
            rows.append(("slider: new strength -> first token (build + write + load + prefill)", ms(cold)))
            columns = [Condition(), Condition(adapter="rank1"), ablated]
            three = [first_tokens(runner, columns, f"Question {trial}: what now?", sampling)
                     for trial in range(5)]
            for index, condition in enumerate(columns):
                rows.append((f"submit -> first token, column '{condition.label}', 3 columns at once",
                             ms([trial[index] for trial in three])))
            raw["median_slider_s"] = statistics.median(cold)
        print(write_table(args.out, "The real default model on this machine", config, rows))
        Path(args.out).with_suffix(".json").write_text(json.dumps(raw, indent=1, default=float) + "\n")
        print(f"measured {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    main()
