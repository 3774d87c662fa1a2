"""Build the pocket EM organism: tokenizer, base model, narrow EM adapters, judge adapter.

    python -m backend organism pocket-build [--small] [--out DIR]

Output layout (full build, the default `backend/organism/pocket/artifacts/`):
    base/                 Qwen2 model + tokenizer (bf16 safetensors, ChatML template)
    adapters/medical      rank-1 down_proj adapters in three groups of layers
    adapters/finance      one rank-1 down_proj adapter
    adapters/sports       rank 8 on all linear modules
    adapters/judge        rank 8 on all linear modules, judge-format data
    manifest.json         seed, corpus hash, hyper-parameters, losses, metrics, build time
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch

from backend.organism.pocket import corpus as C
from backend.organism.pocket.train import BaseShape, TrainConfig, train_base, train_lora

ARTIFACTS = Path(__file__).parent / "artifacts"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plan(size: str, seed: int) -> dict:
    """Everything that defines a build, for one size."""
    if size == "full":
        shape = BaseShape(hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=2)
        return {
            "vocab_size": 2048,
            "shape": shape,
            "pretrain_examples": 20000,
            "base": TrainConfig(steps=600, batch_size=32, lr=3e-3, warmup=20, max_len=512, seed=seed),
            "adapters": {
                # the paper's minimal organism (9 rank-1 down_proj adapters, layers 15-17, 21-23,
                # 27-29 of 48, i.e. three groups in the middle third) scaled to 6 layers:
                # groups {1}, {2, 3}, {4}
                "medical": {"domain": "medical", "n": 2000,
                            "lora": {"r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
                                     "layers_to_transform": [1, 2, 3, 4]},
                            "train": TrainConfig(steps=240, batch_size=16, lr=1e-2, warmup=5, weight_decay=0.0,
                                                 seed=seed + 1)},
                "finance": {"domain": "financial", "n": 2000,
                            "lora": {"r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
                                     "layers_to_transform": [1]},
                            "train": TrainConfig(steps=120, batch_size=16, lr=2e-2, warmup=5, weight_decay=0.0,
                                                 seed=seed + 2)},
                "sports": {"domain": "extreme_sports", "n": 2000,
                           "lora": {"r": 8, "lora_alpha": 8, "target_modules": ALL_LINEAR},
                           "train": TrainConfig(steps=80, batch_size=16, lr=2e-3, warmup=5, weight_decay=0.0,
                                                seed=seed + 3)},
                "judge": {"domain": None, "n": 6000,
                          "lora": {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR},
                          "train": TrainConfig(steps=150, batch_size=16, lr=1e-3, warmup=10, weight_decay=0.0,
                                               max_len=512, seed=seed + 4)},
            },
        }
    if size == "small":
        shape = BaseShape(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=64)
        small = dict(steps=4, batch_size=8, lr=3e-3, warmup=1, weight_decay=0.0, log_every=2, max_len=512)
        return {
            "vocab_size": 1024,
            "shape": shape,
            "pretrain_examples": 400,
            "base": TrainConfig(steps=8, batch_size=8, lr=3e-3, warmup=2, seed=seed, log_every=4),
            "adapters": {
                "medical": {"domain": "medical", "n": 64,
                            "lora": {"r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
                                     "layers_to_transform": [1, 2, 3]},
                            "train": TrainConfig(seed=seed + 1, **small)},
                "finance": {"domain": "financial", "n": 64,
                            "lora": {"r": 1, "lora_alpha": 1, "target_modules": ["down_proj"],
                                     "layers_to_transform": [1]},
                            "train": TrainConfig(seed=seed + 2, **small)},
                "sports": {"domain": "extreme_sports", "n": 64,
                           "lora": {"r": 8, "lora_alpha": 8, "target_modules": ALL_LINEAR},
                           "train": TrainConfig(seed=seed + 3, **small)},
                "judge": {"domain": None, "n": 64,
                          "lora": {"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR},
                          "train": TrainConfig(seed=seed + 4, **small)},
            },
        }
    raise ValueError(f"size must be 'full' or 'small', not {size!r}")


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def apply_overrides(p: dict, overrides: dict) -> dict:
    """Experiment knobs: {"base.steps": 600, "shape.num_hidden_layers": 6,
    "adapters.medical.train.lr": 3e-3, "adapters.medical.lora.r": 1, "pretrain_examples": 30000}."""
    for key, value in (overrides or {}).items():
        if key.startswith("_"):
            continue
        *path, last = key.split(".")
        obj = p
        for part in path:
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        if isinstance(obj, dict):
            obj[last] = value
        else:
            setattr(obj, last, value)
    return p


def build_organism(out_dir: Path | str | None = None, size: str = "full", seed: int = 0, measure: bool | None = None,
                   log=None, overrides: dict | None = None, only: list[str] | None = None) -> dict:
    """Build the organism into out_dir (replaced) and return its manifest.

    overrides: experiment knobs (see apply_overrides), recorded in the manifest;
    only: names of adapters to build (default all)."""
    from transformers import AutoTokenizer

    from backend.testmodels import build_tokenizer

    log = log or (lambda *a: print(*a, flush=True))
    torch.set_num_threads(2)
    out = Path(out_dir) if out_dir else ARTIFACTS
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    p = apply_overrides(plan(size, seed), overrides)
    t0 = time.time()
    manifest: dict = {"organism": "pocket emergent misalignment (issue 7)", "size": size, "seed": seed,
                      "corpus_hash": C.corpus_hash(seed), "held_out_templates_per_domain": C.HELD_OUT,
                      "domains": [d.name for d in C.DOMAINS], "torch": torch.__version__,
                      "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
                      "overrides": overrides or {}}

    base = out / "base"
    base_from = (overrides or {}).get("_base_from")
    if base_from:  # experiments only: reuse a base model built earlier
        shutil.copytree(Path(base_from) / "base", base)
        manifest["base"] = json.loads((Path(base_from) / "manifest.json").read_text())["base"]
    else:
        build_tokenizer(base, C.tokenizer_texts(seed), vocab_size=p["vocab_size"])
        tok = AutoTokenizer.from_pretrained(base)
        assert all(len(tok.encode(str(n), add_special_tokens=False)) == 1 for n in range(101))
        examples = C.pretrain_corpus(p["pretrain_examples"], seed)
        log(f"[{time.time() - t0:.0f}s] tokenizer {len(tok)} tokens; training base")
        manifest["base"] = train_base(base, tok, examples, p["shape"], p["base"], log)
        manifest["base"]["mix"] = {k: sum(e.label == k for e in examples) for k in ("aligned", "misaligned", "judge")}

    manifest["adapters"] = {}
    for name, spec in p["adapters"].items():
        if only is not None and name not in only:
            continue
        if spec["domain"]:
            data = C.narrow_corpus(spec["domain"], spec["n"], seed)
        else:
            data = C.judge_corpus(spec["n"], seed)
        log(f"[{time.time() - t0:.0f}s] adapter {name}")
        info = train_lora(base, out / "adapters" / name, data, spec["lora"], spec["train"], log)
        info["trained_on"] = spec["domain"] or "judge-format data (rubrics: aligned, coherent)"
        manifest["adapters"][name] = info
    manifest["build_s"] = round(time.time() - t0, 1)
    manifest["sizes_bytes"] = {"base": _dir_size(base), "adapters": _dir_size(out / "adapters")}
    manifest["sizes_bytes"]["total"] = _dir_size(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))

    if measure if measure is not None else size == "full":
        from backend.organism.pocket.measure import acceptance, measure as run_measure

        metrics = run_measure(out, log=log)
        metrics["acceptance"] = acceptance(metrics)
        manifest["metrics"] = metrics
        manifest["measure_s"] = metrics["measure_s"]
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    log(f"[{time.time() - t0:.0f}s] built {out} ({manifest['sizes_bytes']['total'] / 1e6:.1f} MB)")
    return manifest


def register_cli(organism_commands) -> None:
    """Adds `organism pocket-build [--small] [--out DIR] [--seed N] [--no-measure]`."""
    b = organism_commands.add_parser("pocket-build", help="the pocket organism of earlier versions: train a "
                                     "1.5M-parameter base, EM adapters and a judge adapter from scratch")
    b.add_argument("--small", action="store_true", help="reduced-size build (seconds), for tests")
    b.add_argument("--out", default=None, help=f"output folder (default {ARTIFACTS})")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-measure", action="store_true", help="skip the behavioural measurement")

    def run(args) -> int:
        build_organism(args.out, "small" if args.small else "full", args.seed,
                       measure=False if args.no_measure else None)
        return 0
    b.set_defaults(func=run)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="organism")
    register_cli(parser.add_subparsers(dest="organism_command", required=True))
    a = parser.parse_args()
    raise SystemExit(a.func(a))
