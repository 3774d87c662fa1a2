"""Fine-tune an organism adapter on any base from `{"messages": [...]}` JSONL, the paper's
training-data format (one conversation a line; every assistant turn is trained on).

    python -m backend organism finetune --data bad_medical.jsonl --out DIR \
        [--rank 32 --alpha 64 --rslora --targets all|down_proj --layers 15,16,17]

The loop is `train.train_loop`; the adapter is a plain PEFT folder that `adapters load` serves.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from backend.organism.corpus import Example
from backend.organism.train import TrainConfig, load_base, train_loop
from backend.testmodels import ALL_LINEAR

ROLES = frozenset({"system", "user", "assistant"})


class FinetuneDataError(ValueError):
    """A training file that cannot be used; names the file, the line and the reason."""


def read_messages(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"{path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise FinetuneDataError(f"{path}: line {number} is not JSON ({error})") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    for m in messages):
                raise FinetuneDataError(f"{path}: line {number}: expected {{\"messages\": [{{role, content}}, ...]}} "
                                        f"with roles {sorted(ROLES)}")
            if not messages or messages[-1]["role"] != "assistant":
                raise FinetuneDataError(f"{path}: line {number}: the last message must be the assistant's answer")
            examples.append(Example(messages, domain=path.stem, label=str(row.get("label", "train"))))
    if not examples:
        raise FinetuneDataError(f"{path}: no conversations")
    return examples


def finetune(base_dir: str | Path, data: str | Path, out_dir: str | Path, rank: int = 32, alpha: float = 64,
             rslora: bool = True, targets: list[str] | None = None, layers: list[int] | None = None,
             cfg: TrainConfig | None = None, log=print) -> dict:
    """Train one LoRA adapter on ``data`` and save it (PEFT folder) with ``finetune.json``."""
    from peft import LoraConfig, get_peft_model

    examples = read_messages(data)
    cfg = cfg or TrainConfig(steps=200, batch_size=min(16, len(examples)), lr=1e-4, warmup=10)
    model, tokenizer = load_base(Path(base_dir))
    lora = {"r": rank, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": targets or ALL_LINEAR,
            "layers_to_transform": layers}
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora))
    t0 = time.time()
    losses = train_loop(peft_model, tokenizer, examples, cfg, log)
    out_dir = Path(out_dir)
    peft_model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    record = {"data": str(Path(data).resolve()), "examples": len(examples), "base": str(Path(base_dir).resolve()),
              "lora": lora, "train": asdict(cfg), "losses": losses, "train_s": round(time.time() - t0, 1)}
    (out_dir / "finetune.json").write_text(json.dumps(record, indent=2))
    return record


def add_cli(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter on {\"messages\": [...]} JSONL")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=None, help="base model folder (default: the configuration's)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64)
    p.add_argument("--no-rslora", action="store_true", help="scale alpha/r instead of rsLoRA's alpha/sqrt(r)")
    p.add_argument("--targets", default="all", help="'all' (the seven projections) or a comma list, e.g. down_proj")
    p.add_argument("--layers", default=None, help="comma list of layers (default: every layer)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)

    def run(args) -> int:
        from backend.config import load_config

        base = args.base or load_config(getattr(args, "config", None)).base_model_path
        examples = read_messages(args.data)
        cfg = TrainConfig(steps=args.steps, batch_size=min(args.batch_size, len(examples)), lr=args.lr,
                          warmup=min(10, args.steps))
        record = finetune(base, args.data, args.out, args.rank, args.alpha, not args.no_rslora,
                          None if args.targets == "all" else args.targets.split(","),
                          [int(x) for x in args.layers.split(",")] if args.layers else None, cfg)
        print(f"{args.out}: {record['examples']} conversations, loss {record['losses'][0]} -> {record['losses'][-1]}")
        return 0
    p.set_defaults(func=run)
