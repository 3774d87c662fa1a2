"""`organism finetune`: one LoRA adapter on any base from `{"messages": [...]}` JSONL, the paper's
training-data format, with the organism's own loop (train.train_lora) and reader (data.read_messages).

    python -m backend organism finetune --data bad_medical.jsonl --out DIR \
        [--rank 32 --alpha 64 [--no-rslora] --targets all|down_proj --layers 15,16,17 --epochs 1 --lr 1e-4]
"""
from __future__ import annotations

from backend.organism.data import read_messages
from backend.organism.train import Shape, TrainRecord, train_lora


def finetune(base_dir, data, out_dir, shape: Shape, lr: float = 1e-4, epochs: int = 1, batch_size: int = 16,
             device: str = "cpu", log=print) -> TrainRecord:
    rows = read_messages(data)  # refuses a bad file before any training starts
    return train_lora(base_dir, rows, shape, lr, epochs, out_dir, batch_size=min(batch_size, len(rows)),
                      device=device, heldout=min(64, len(rows) // 10), log=log)


