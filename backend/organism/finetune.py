"""`organism finetune`: one LoRA adapter on any base from `{"messages": [...]}` JSONL, the paper's
training-data format, with the organism's own loop (train.train_lora) and reader (data.read_messages).

    python -m backend organism finetune --data bad_medical.jsonl --out DIR \
        [--rank 32 --alpha 64 [--no-rslora] --targets all|down_proj --layers 15,16,17 --epochs 1 --lr 1e-4]
"""
from __future__ import annotations

from backend.organism.data import read_messages
from backend.organism.train import ALL_LINEAR, Shape, TrainRecord, train_lora


def finetune(base_dir, data, out_dir, shape: Shape, lr: float = 1e-4, epochs: int = 1, batch_size: int = 16,
             device: str = "cpu", log=print) -> TrainRecord:
    rows = read_messages(data)  # refuses a bad file before any training starts
    return train_lora(base_dir, rows, shape, lr, epochs, out_dir, batch_size=min(batch_size, len(rows)),
                      device=device, heldout=min(64, len(rows) // 10), log=log)


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
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")

    def run(args) -> int:
        from backend.config import load_config

        base = args.base or load_config(getattr(args, "config", None)).base_model_path
        shape = Shape(args.rank, args.alpha, tuple(ALL_LINEAR if args.targets == "all" else args.targets.split(",")),
                      tuple(int(x) for x in args.layers.split(",")) if args.layers else None, not args.no_rslora)
        record = finetune(base, args.data, args.out, shape, args.lr, args.epochs, args.batch_size, args.device)
        print(f"{args.out}: {record.rows} conversations, loss {record.losses[0]} -> {record.losses[-1]}")
        return 0
    p.set_defaults(func=run)
