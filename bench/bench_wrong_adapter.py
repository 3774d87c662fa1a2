"""The wrong-adapter check (vLLM issue #47724): every LoRA slot taken, new adapters loaded at
runtime while the others decode; each answer compared greedily with the same request alone.

    python bench/bench_wrong_adapter.py --config CONFIG [--start] [--rounds 3] [--max-tokens 192]

Works against the running server of any configuration of ours (the CPU build or the CUDA build;
`--start` starts it with `backend.serving.start_server` and stops it after). What it does:

1. Writes S + M random rank-1 LoRA adapters for the server's base (`lora_files.write_lora`, on
   `down_proj` of every layer, distinct seeds), S = the server's LoRA slots (`--max-loras` as
   `serve` passed it: on the CPU build one more than the registry holds), M = `--churn`.
2. Alone: each of the S hot requests (one per hot adapter) and one base request, greedy
   (temperature 0, `ignore_eos`), one at a time.
3. Control: all hot requests at once, no loads.
4. Churn (`--rounds` times, per `--mode`): all hot requests at once and, once they decode, the M
   churn adapters loaded and unloaded again and again under new names until the hot requests end
   (`api`: straight through /v1/load_lora_adapter; `registry`: through `AdapterRegistry`, the
   product's path, whose capacity on the CPU build keeps one slot spare).
5. Each answer that differs from its alone answer is scored teacher-forced under its own model
   alone (`prompt_logprobs`): its margin is the largest (top-1 logprob - logprob of the token it
   chose) over its tokens. A right model answering greedily has margin ~0 (prefill vs decode
   rounding: the `self` floor, measured on the alone answers); another adapter's weights give
   margins like the `cross` figure (adapter i's alone answer scored under adapter j). An answer
   is `wrong` above the tolerance (--tol, default max(0.05, 10 x the self floor), checked to sit
   well below the cross figure), `numerics` when it differs with a margin under it.

Exit code 1 when any answer is wrong. The JSON (--out-json) has every figure and timestamp.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

PROMPTS = ["Write a long story about a ship that sails to the end of the world.",
           "Explain in detail how to plan a garden for a whole year.",
           "Describe every step of baking bread at home, from flour to the first slice.",
           "Tell me everything you know about the history of clocks."]


# ----------------------------------------------------------------------------- server facts

def server_facts(config, slots: int | None) -> dict:
    """url, headers, the base's served name, LoRA slots / cache size / modules of the server."""
    from backend.serving import auth_headers, read_state, server_url, vllm_command
    url, headers = server_url(config), auth_headers(config)
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    base_name = next(card["id"] for card in models if card.get("parent") is None)
    state = read_state(config)
    facts = {"url": url, "headers": headers, "base_name": base_name, "device": state.device if state else None,
             "lora_target_modules": state.lora_target_modules if state else None}
    if state and state.url == url:
        port = int(url.rsplit(":", 1)[1])
        argv, _ = vllm_command(config, port, state.device)  # the flags `serve` gave this server
        facts["max_loras"] = int(argv[argv.index("--max-loras") + 1])
        facts["max_cpu_loras"] = int(argv[argv.index("--max-cpu-loras") + 1])
        facts["max_lora_rank"] = state.max_lora_rank
        facts["registry_capacity"] = state.max_cpu_loras
    if slots:
        facts["max_loras"] = slots
    if "max_loras" not in facts:
        raise SystemExit("not a server we started: give its LoRA slots with --slots")
    return facts


def tokenizer_of(config):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(config.base_model_path)


def prompt_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                        add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
    return list(ids)


# ----------------------------------------------------------------------------- adapters

def down_proj_std(base: Path) -> float:
    """The std of layer 0's down_proj weight, read from the safetensors without loading the model."""
    from safetensors import safe_open
    files = sorted(Path(base).glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if key.endswith("layers.0.mlp.down_proj.weight"):
                    return float(handle.get_tensor(key).float().std())
    raise SystemExit(f"{base}: no layers.0.mlp.down_proj.weight in its safetensors")


def make_adapters(config, count: int, strength: float, folder: Path) -> tuple[list[Path], float]:
    """`count` rank-1 down_proj adapters on every layer, distinct seeds. With A and B of std s the
    update's scale per layer is s^2 sqrt(intermediate) against the weight's w sqrt(intermediate):
    s = sqrt(strength x w) makes it `strength` of the layer's own output."""
    from backend.architecture import BaseShape
    from backend.lora_files import write_lora
    base = Path(config.base_model_path)
    std = (strength * down_proj_std(base)) ** 0.5
    layers = list(range(BaseShape.from_model(str(base)).num_layers))
    paths = []
    for index in range(count):
        path = folder / f"wa-{index}"
        if not (path / "adapter_config.json").exists():
            write_lora(base, path, 1, ["down_proj"], layers, seed=1000 + index, std=std)
        paths.append(path)
    return paths, std


# ----------------------------------------------------------------------------- requests

def post(facts: dict, path: str, body: dict, timeout: float = 600) -> dict:
    response = httpx.post(f"{facts['url']}{path}", json=body, headers=facts["headers"], timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"{path} {body.get('model') or body.get('lora_name')}: {response.status_code} "
                           f"{response.text[:300]}")
    try:
        return response.json()
    except ValueError:  # the LoRA endpoints answer in plain text
        return {"text": response.text}


def greedy(facts: dict, model: str, ids: list[int], max_tokens: int) -> dict:
    """Greedy ids of one request (logprobs 1 with tokens as ids gives the chosen ids back)."""
    started = time.time()
    out = post(facts, "/v1/completions", {
        "model": model, "prompt": ids, "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True})
    tokens = out["choices"][0]["logprobs"]["tokens"]
    return {"ids": [int(token.split(":", 1)[1]) for token in tokens], "start": started, "end": time.time()}


def margin(facts: dict, model: str, ids: list[int], generated: list[int]) -> float:
    """max over the generated tokens of (top-1 logprob - logprob of the token), teacher-forced."""
    out = post(facts, "/v1/completions", {"model": model, "prompt": ids + generated, "max_tokens": 1,
                                          "temperature": 0, "prompt_logprobs": 1})
    entries = out["choices"][0]["prompt_logprobs"]
    worst = 0.0
    for position, token in enumerate(generated, start=len(ids)):
        entry = entries[position]
        best = max(value["logprob"] for value in entry.values())
        worst = max(worst, best - entry[str(token)]["logprob"])
    return worst


def load(facts: dict, name: str, path: Path) -> None:
    post(facts, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def unload(facts: dict, name: str) -> None:
    post(facts, "/v1/unload_lora_adapter", {"lora_name": name})


def together(facts: dict, requests: list[tuple[str, list[int]]], max_tokens: int,
             churn=None) -> tuple[list[dict], list[dict]]:
    """All requests at once (a thread each); churn(stop) runs beside them until they end."""
    results: list[dict | Exception] = [None] * len(requests)

    def one(index: int, model: str, ids: list[int]) -> None:
        try:
            results[index] = greedy(facts, model, ids, max_tokens)
        except Exception as error:  # reported per request
            results[index] = error

    threads = [threading.Thread(target=one, args=(i, m, ids)) for i, (m, ids) in enumerate(requests)]
    for thread in threads:
        thread.start()
    stop = threading.Event()
    events: list[dict] = []
    churner = threading.Thread(target=churn, args=(stop, events)) if churn else None
    if churner:
        churner.start()
    for thread in threads:
        thread.join()
    stop.set()
    if churner:
        churner.join()
    return results, events


def churn_loop(facts: dict, config, paths: list[Path], mode: str, delay_s: float, tag: str):
    """Load churn adapters under new names and unload them, over and over, until stopped. `api`:
    all of them, then all unloaded; `registry`: one at a time through AdapterRegistry (load,
    unload), so that the registry never has to evict a hot adapter to make room."""
    from backend.adapters import AdapterRegistry
    registry = AdapterRegistry(config) if mode == "registry" else None

    def run(stop: threading.Event, events: list[dict]) -> None:
        time.sleep(delay_s)  # the hot requests' prefill: the loads land in their decode
        cycle = 0
        while not stop.is_set():
            groups = [[(i, p)] for i, p in enumerate(paths)] if registry else [list(enumerate(paths))]
            for group in groups:
                names = []
                for index, path in group:
                    name = f"wa-churn-{tag}-{cycle}-{index}"
                    t0 = time.time()
                    try:
                        registry.load(name, str(path)) if registry else load(facts, name, path)
                        names.append(name)
                        events.append({"load": name, "start": t0, "end": time.time()})
                    except Exception as error:  # a refused load is a finding, not a crash
                        events.append({"load": name, "start": t0, "end": time.time(), "error": str(error)[:300]})
                for name in names:
                    try:
                        registry.unload(name) if registry else unload(facts, name)
                        events.append({"unload": name, "end": time.time()})
                    except Exception as error:
                        events.append({"unload": name, "end": time.time(), "error": str(error)[:300]})
            cycle += 1
    return run


# ----------------------------------------------------------------------------- the check

def check(config, *, rounds: int, max_tokens: int, churn: int, modes: list[str], strength: float,
          slots: int | None, tol: float | None, delay_s: float, hot: int | None, same_prompt: bool = False) -> dict:
    started = time.time()
    facts = server_facts(config, slots)
    hot_count = hot or facts["max_loras"]
    folder = Path(config.cache) / "wrong-adapter"
    paths, std = make_adapters(config, hot_count + churn, strength, folder)
    hot_paths, churn_paths = paths[:hot_count], paths[hot_count:]
    # A clean start: nothing of an earlier run loaded, then the hot adapters (every slot).
    served = {card["id"] for card in httpx.get(f"{facts['url']}/v1/models", headers=facts["headers"],
                                               timeout=30).json()["data"]}
    for name in sorted(n for n in served if n.startswith("wa-")):
        unload(facts, name)
    for index, path in enumerate(hot_paths):
        load(facts, f"wa-hot-{index}", path)
    tokenizer = tokenizer_of(config)
    names = [f"wa-hot-{i}" for i in range(hot_count)] + [facts["base_name"]]
    # A prompt of its own per request: two requests sharing a prompt could also meet in the prefix
    # cache, which is another fault than the one looked for here (--same-prompt tests that one).
    requests = [(name, prompt_ids(tokenizer, PROMPTS[i % len(PROMPTS)] + ("" if same_prompt else f" ({i + 1})")))
                for i, name in enumerate(names)]

    alone = [greedy(facts, model, ids, max_tokens) for model, ids in requests]
    # The floor (each alone answer under its own model) and the figure a swap shows (adapter i's
    # answer under adapter i+1, the base's under adapter 0).
    self_floor = [margin(facts, model, ids, a["ids"]) for (model, ids), a in zip(requests, alone)]
    cross = [margin(facts, requests[(i + 1) % len(requests)][0], ids, alone[i]["ids"])
             for i, (_, ids) in enumerate(requests)]
    tolerance = tol if tol is not None else max(0.05, 10 * max(self_floor))
    distinct = len({tuple(a["ids"]) for a in alone})

    def judge(results: list, label: str, chosen: list[int]) -> dict:
        rows = []
        for (model, ids), mine, ref in zip([requests[i] for i in chosen], results, [alone[i] for i in chosen]):
            if isinstance(mine, Exception):
                rows.append({"model": model, "verdict": "error", "error": str(mine)[:300]})
                continue
            if mine["ids"] == ref["ids"]:
                rows.append({"model": model, "verdict": "same", "start": mine["start"], "end": mine["end"]})
                continue
            first = next(i for i, (a, b) in enumerate(zip(mine["ids"], ref["ids"])) if a != b)
            worst = margin(facts, model, ids, mine["ids"])
            # Whose weights: the models under which this answer is greedy (margin within tolerance).
            fits = [other for other, _ in (requests[i] for i in chosen) if other != model
                    and margin(facts, other, ids, mine["ids"]) <= tolerance] if worst > tolerance else []
            rows.append({"model": model, "verdict": "wrong" if worst > tolerance else "numerics",
                         "first_difference": first, "margin": worst, "greedy_under": fits,
                         "start": mine["start"], "end": mine["end"], "ids": mine["ids"]})
        counts = {v: sum(r["verdict"] == v for r in rows) for v in ("same", "numerics", "wrong", "error")}
        print(f"{label}: {counts}", flush=True)
        return {"label": label, "counts": counts, "rows": rows}

    everyone = list(range(len(requests)))
    results, _ = together(facts, requests, max_tokens)
    runs = [judge(results, "control (all at once, no loads)", everyone)]
    notes = []
    for mode in modes:
        chosen = everyone
        if mode == "registry":
            # The registry evicts its least recently used adapter once the server holds `capacity`;
            # the hot ones must leave room for one churn adapter, or it would unload them mid-answer.
            capacity = facts.get("registry_capacity") or hot_count + 1
            room = min(hot_count, capacity - 1)
            if room < hot_count:
                notes.append(f"registry mode: {room} hot adapters of {hot_count} (registry capacity {capacity} "
                             f"< the server's {facts['max_loras']} slots + 1: the product never fills every slot)")
                for index in range(room, hot_count):
                    unload(facts, f"wa-hot-{index}")
            chosen = list(range(room)) + [len(requests) - 1]
        for round_index in range(rounds):
            loop = churn_loop(facts, config, churn_paths, mode, delay_s, f"{mode}{round_index}")
            results, events = together(facts, [requests[i] for i in chosen], max_tokens, loop)
            run = judge(results, f"{mode} churn, round {round_index + 1}", chosen)
            ends = [r["end"] for r in results if isinstance(r, dict)]
            starts = [r["start"] for r in results if isinstance(r, dict)]
            loads = [e for e in events if "load" in e and "error" not in e]
            run["loads"] = len(loads)
            run["loads_during_decode"] = sum(max(starts) < e["end"] < min(ends) for e in loads) if ends else 0
            run["errors"] = [e for e in events if "error" in e][:5]
            runs.append(run)
    served = {card["id"] for card in httpx.get(f"{facts['url']}/v1/models", headers=facts["headers"],
                                               timeout=30).json()["data"]}
    for name in sorted(n for n in served if n.startswith("wa-")):
        unload(facts, name)
    wrong = sum(run["counts"]["wrong"] for run in runs)
    return {"facts": {k: v for k, v in facts.items() if k != "headers"}, "hot": hot_count, "churn": churn,
            "max_tokens": max_tokens, "adapter_std": std, "strength": strength, "distinct_alone_answers": distinct,
            "requests": len(requests), "self_floor": self_floor, "cross": cross, "tolerance": tolerance,
            "cross_min_over_tolerance": min(cross) / tolerance, "runs": runs, "notes": notes, "wrong": wrong,
            "seconds": time.time() - started}


def summary(result: dict) -> str:
    facts = result["facts"]
    lines = [f"server {facts['url']} ({facts.get('device')}): --max-loras {facts['max_loras']}, "
             f"--max-cpu-loras {facts.get('max_cpu_loras')}, registry capacity {facts.get('registry_capacity')}; "
             f"{result['hot']} hot adapters + the base decoding {result['max_tokens']} greedy tokens, "
             f"{result['churn']} churn adapters; {result['distinct_alone_answers']} distinct alone answers of "
             f"{result['requests']}",
             f"margins: self floor max {max(result['self_floor']):.2g}, cross (a swap) min {min(result['cross']):.3g} "
             f"median {statistics.median(result['cross']):.3g}; tolerance {result['tolerance']:.3g}",
             "| run | same | numerics | wrong | error | loads (during decode) |", "|---|---|---|---|---|---|"]
    for run in result["runs"]:
        c = run["counts"]
        loads = f"{run['loads']} ({run['loads_during_decode']})" if "loads" in run else "-"
        lines.append(f"| {run['label']} | {c['same']} | {c['numerics']} | {c['wrong']} | {c['error']} | {loads} |")
    verdict = ("WRONG ADAPTER: some answers came from other weights" if result["wrong"] else
               "no wrong answer" + ("" if result["cross_min_over_tolerance"] > 3 else
                                    " (but the adapters are barely distinguishable: inconclusive)"))
    for run in result["runs"]:
        for row in run["rows"]:
            if row["verdict"] == "wrong":
                lines.append(f"wrong: {run['label']}: {row['model']} from token {row['first_difference']} "
                             f"(margin {row['margin']:.2f}; greedy under {', '.join(row['greedy_under']) or 'none'})")
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append(f"verdict: {verdict}; {result['seconds']:.0f} s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="configuration file (default: config.toml)")
    parser.add_argument("--start", action="store_true", help="start the configuration's server, stop it after")
    parser.add_argument("--rounds", type=int, default=3, help="churn rounds per mode")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--churn", type=int, default=2, help="adapters loaded and unloaded during decode")
    parser.add_argument("--mode", choices=["api", "registry", "both"], default="both")
    parser.add_argument("--hot", type=int, help="hot adapters (default: every LoRA slot of the server)")
    parser.add_argument("--slots", type=int, help="the server's --max-loras, for a server we did not start")
    parser.add_argument("--strength", type=float, default=0.3, help="adapter update / layer output, per layer")
    parser.add_argument("--tol", type=float, help="margin above which an answer is wrong")
    parser.add_argument("--delay-s", type=float, default=0.3, help="from the hot requests' start to the first load")
    parser.add_argument("--same-prompt", action="store_true", help="one prompt for every request (prefix cache)")
    parser.add_argument("--out-json", type=Path)
    args = parser.parse_args()

    from backend.config import load_config
    from backend.serving import start_server, stop_server
    config = load_config(args.config)
    if args.start:
        start_server(config)
    try:
        result = check(config, rounds=args.rounds, max_tokens=args.max_tokens, churn=args.churn,
                       modes=["api", "registry"] if args.mode == "both" else [args.mode], strength=args.strength,
                       slots=args.slots, tol=args.tol, delay_s=args.delay_s, hot=args.hot,
                       same_prompt=args.same_prompt)
    finally:
        if args.start:
            stop_server(config)
    result["command"] = " ".join(sys.argv)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=1))
    print(summary(result))
    return 1 if result["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
