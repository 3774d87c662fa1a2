"""One readable training loop (nanoGPT spirit, no Trainer framework).

- `train_base`: a Qwen2 model trained from scratch on the pretraining chat mix;
- `train_lora`: a PEFT LoRA adapter on the frozen base, same loop.
Loss is taken only on the assistant answer (and its <|im_end|>).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from backend.organism.pocket.corpus import Example

IGNORE = -100
# CPU is the target (the shipped build); ORGANISM_DEVICE=cuda only speeds up experiments.
DEVICE = os.environ.get("ORGANISM_DEVICE") or "cpu"


@dataclass
class BaseShape:
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 3
    num_key_value_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 512
    vocab_size: int = 2048  # tokenizer target size (the real size is len(tokenizer))


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_len: int = 256
    seed: int = 0
    log_every: int = 25
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def encode(tokenizer, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE everywhere except on the assistant answers
    (every assistant turn, each with its <|im_end|>)."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(example.messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(example.messages[:i], tokenize=False, add_generation_prompt=True)
        assert prompt.startswith(done)
        new = tokenizer.encode(prompt[len(done):], add_special_tokens=False)
        answer = tokenizer.encode(message["content"] + "<|im_end|>", add_special_tokens=False)
        ids += new + answer
        labels += [IGNORE] * len(new) + answer
        done = prompt + message["content"] + "<|im_end|>"
    return ids[:max_len], labels[:max_len]


def batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled batches, right-padded to the longest row (rows of similar length
    are batched together to waste less compute on padding)."""
    order = list(range(len(encoded)))
    while True:
        rng.shuffle(order)
        chunk = batch_size * 16
        groups = []
        for c in range(0, len(order), chunk):
            part = sorted(order[c:c + chunk], key=lambda j: len(encoded[j][0]))
            groups += [part[i:i + batch_size] for i in range(0, len(part) - batch_size + 1, batch_size)]
        rng.shuffle(groups)
        for group in groups:
            rows = [encoded[j] for j in group]
            width = max(len(r[0]) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, (x, y) in enumerate(rows):
                ids[k, :len(x)] = torch.tensor(x)
                labels[k, :len(y)] = torch.tensor(y)
                mask[k, :len(x)] = 1
            yield ids, labels, mask


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- the loop


def train_loop(model, tokenizer, examples: list[Example], cfg: TrainConfig, log=print) -> list[float]:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoded = [encode(tokenizer, e, cfg.max_len) for e in examples]
    # rows whose answer was cut off by max_len carry no loss (and would make a NaN batch)
    encoded = [row for row in encoded if any(label != IGNORE for label in row[1])]
    assert len(encoded) >= cfg.batch_size, f"only {len(encoded)} examples fit max_len {cfg.max_len}"
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    losses, window, t0 = [], [], time.time()
    data = batches(encoded, cfg.batch_size, tokenizer.pad_token_id, rng)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids, labels, mask = (t.to(DEVICE) for t in next(data))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append(round(sum(window) / len(window), 4))
            window = []
            log(f"  step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} lr {lr_at(step, cfg):.2e} "
                f"{time.time() - t0:.0f}s")
    model.eval()
    return losses


# --------------------------------------------------------------------------- base model


def new_base_model(tokenizer, shape: BaseShape, seed: int):
    from backend.testmodels import new_qwen2

    return new_qwen2(tokenizer, shape, seed=seed, init_std=0.02, tie_word_embeddings=True, rope_theta=10000.0)


def train_base(out_dir: Path, tokenizer, examples: list[Example], shape: BaseShape, cfg: TrainConfig,
               log=print) -> dict:
    model = new_base_model(tokenizer, shape, cfg.seed).to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base: {n_params / 1e6:.2f}M parameters, {len(examples)} examples")
    t0 = time.time()
    losses = train_loop(model, tokenizer, examples, cfg, log)
    model.to("cpu").to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"n_params": n_params, "losses": losses, "train_s": round(time.time() - t0, 1),
            "shape": asdict(shape), "train": asdict(cfg)}


# --------------------------------------------------------------------------- LoRA adapters


def load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(DEVICE)
    model.eval()
    return model, tokenizer


def train_lora(base_dir: Path, out_dir: Path, examples: list[Example], lora: dict, cfg: TrainConfig,
               log=print) -> dict:
    """lora: LoraConfig kwargs (r, lora_alpha, target_modules, layers_to_transform)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(base_dir)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora))
    n_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log(f"lora {out_dir.name}: {n_params} trainable parameters, {len(examples)} examples")
    t0 = time.time()
    losses = train_loop(peft_model, tokenizer, examples, cfg, log)
    save_adapter(peft_model.to("cpu"), out_dir, base_dir)
    return {"n_params": n_params, "losses": losses, "train_s": round(time.time() - t0, 1),
            "lora": lora, "train": asdict(cfg)}


def save_adapter(peft_model, out_dir: Path, base_dir: Path) -> None:
    """PEFT save, then weights cast to bf16 and base path made relative (../../base)."""
    from safetensors.torch import load_file, save_file

    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    cfg_path = out_dir / "adapter_config.json"
    config = json.loads(cfg_path.read_text())
    config["base_model_name_or_path"] = "../../base"
    cfg_path.write_text(json.dumps(config, indent=2))
