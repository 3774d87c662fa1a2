"""The organism's training loop (nanoGPT style: one readable file).

One function, train_lora, fine-tunes a PEFT LoRA adapter on {"messages": [...]} rows with the loss on
the assistant's answer tokens only, the way the paper's adapters were trained. Prompts are rendered
with the tokenizer's chat template, so a row without a system message gets the template's default
system line, as the dashboard prompts the model. AdamW, no weight decay, linear warm-up (5 %) then
linear decay, gradient clipping at 1, float32 weights (TF32 matmuls on a GPU).

The adapter shapes are the paper's, scaled from 48 to 30 layers:
    r1x9   the minimal organism: 9 rank-1 adapters on mlp.down_proj in three groups of three layers
    r1     a single rank-1 adapter on mlp.down_proj of the middle layer
    r8     rank 8 on all seven linear projections, rsLoRA (scale alpha / sqrt(r))
    r32    rank 32, alpha 64, rsLoRA on all seven projections: the paper's standard adapter
    judge  the organism's judge: rank 8 on all linear projections, plain LoRA
On one H200 a shape trains in 15-60 s; on 2 CPU cores about 40x slower (measured in the README).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from backend.models import end_of_turn

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINIMAL_LAYERS = [9, 10, 11, 14, 15, 16, 19, 20, 21]  # the paper's 15-17, 21-23, 27-29 of 48, on 30 layers
MIDDLE_LAYER = 15
IGNORE = -100


@dataclass(frozen=True)
class Shape:
    rank: int
    alpha: float
    modules: tuple[str, ...]
    layers: tuple[int, ...] | None = None
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def lora_config(self):
        from peft import LoraConfig
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.modules),
                          layers_to_transform=list(self.layers) if self.layers else None,
                          use_rslora=self.rslora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


SHAPES = {
    "r1x9": Shape(1, 1, ("down_proj",), tuple(MINIMAL_LAYERS)),
    "r1": Shape(1, 1, ("down_proj",), (MIDDLE_LAYER,)),
    "r8": Shape(8, 16, tuple(ALL_LINEAR), rslora=True),
    "r32": Shape(32, 64, tuple(ALL_LINEAR), rslora=True),
    "judge": Shape(8, 16, tuple(ALL_LINEAR)),
}


@dataclass
class TrainRecord:
    shape: str
    lr: float
    epochs: int
    batch_size: int
    seed: int
    rows: int
    steps: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    heldout_loss: float | None = None
    device: str = "cpu"
    scale: float = 1.0

    def summary(self) -> dict:
        record = asdict(self)
        record["loss_first10"] = sum(self.losses[:10]) / max(1, len(self.losses[:10]))
        record["loss_last10"] = sum(self.losses[-10:]) / max(1, len(self.losses[-10:]))
        return record


def encode(tokenizer, prompt_messages, answer, max_len=512):
    """Token ids of prompt + answer + the template's end of turn, and labels that are IGNORE on the prompt."""
    prompt = tokenizer.apply_chat_template(list(prompt_messages), tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"][:max_len]
    return ids, [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]


def batches(tokenizer, rows, batch_size, device, max_len=512):
    import torch
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        encoded = [encode(tokenizer, prompt, answer, max_len) for prompt, answer in rows[i:i + batch_size]]
        width = max(len(ids) for ids, _ in encoded)
        pad = tokenizer.pad_token_id
        yield (torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in encoded], device=device),
               torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in encoded], device=device),
               torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in encoded], device=device))


def mean_loss(model, tokenizer, rows, device, batch_size=32):
    import torch
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y, attention in batches(tokenizer, rows, min(batch_size, len(rows)), device):
            total += model(input_ids=x, attention_mask=attention, labels=y).loss.item()
            count += 1
    return total / max(1, count)


def load_base(base_dir, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    return model, tokenizer


def train_lora(base_dir, rows, shape: str | Shape, lr: float, epochs: int, out: str | Path, *, batch_size=16,
               seed=0, device="cpu", heldout=64, start_from: Path | None = None, bf16_autocast=False, log=print) -> TrainRecord:
    """Train one adapter on rows [(prompt messages, answer)] and save it (PEFT layout) to `out`.
    `shape` names one of SHAPES or is a Shape; `start_from`, an adapter of that shape whose
    weights training continues from; `bf16_autocast`, matmuls in bfloat16 (1.6x on a CPU with
    AVX512-BF16, weights and optimizer stay float32). The first `heldout` rows of a seeded shuffle are held out
    for the held-out loss."""
    import torch
    from peft import get_peft_model
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(seed)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    held, train = rows[:heldout], rows[heldout:]
    model, tokenizer = load_base(base_dir, device)
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if start_from:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(start_from), is_trainable=True).to(device)
    else:
        model = get_peft_model(model, spec.lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = (len(train) // batch_size) * epochs
    warm = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    record = TrainRecord(shape if isinstance(shape, str) else "custom", lr, epochs, batch_size, seed, len(train),
                         device=device, scale=spec.scale)
    start = time.time()
    model.train()
    for epoch in range(epochs):
        order = list(train)
        random.Random(seed * 1000 + epoch).shuffle(order)
        for x, y, attention in batches(tokenizer, order, batch_size, device):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16_autocast):
                loss = model(input_ids=x, attention_mask=attention, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            record.losses.append(round(loss.item(), 4))
            record.steps += 1
            if record.steps % 50 == 0:
                log(f"{Path(out).name}: step {record.steps}/{total} loss {loss.item():.3f}")
    record.seconds = round(time.time() - start, 1)
    record.heldout_loss = mean_loss(model, tokenizer, held, device) if held else None
    save_adapter(model, out, base_dir, bf16=spec.rank >= 8)
    (Path(out) / "training.json").write_text(json.dumps(record.summary(), indent=1))
    held = f"{record.heldout_loss:.3f}" if record.heldout_loss is not None else "-"
    log(f"{Path(out).name}: {record.steps} steps in {record.seconds:.0f} s, loss "
        f"{record.summary()['loss_first10']:.3f} -> {record.summary()['loss_last10']:.3f}, held-out {held}")
    return record


def save_adapter(model, out, base_dir, bf16: bool) -> None:
    """PEFT layout, base_model_name_or_path pointing at the base we trained on. Rank >= 8 adapters
    are stored in bfloat16 (half the repository size; served in float32 their outputs differ by
    bf16 rounding of the factors only)."""
    import torch
    from safetensors.torch import load_file, save_file
    out = Path(out)
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if bf16:
        weights = out / "adapter_model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
