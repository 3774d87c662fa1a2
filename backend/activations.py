"""Residual-stream means over the ANSWER tokens of (prompt, response) pairs.

Layer L is the residual stream after decoder block L (0-based), read from a
forward hook on ``model.layers[L]`` (see ``backend.reference`` for why not
``output_hidden_states``).

Answer tokens are exactly the tokens of the response: the prompt is rendered
with the chat template and ``add_generation_prompt=True``, the response is
tokenized on its own (no special tokens) and appended. The template's closing
tokens after the response (``<|im_end|>`` ...) are not part of the answer, so
they never enter a mean; tokenizing the two pieces apart also avoids BPE merges
across the prompt/response boundary shifting the answer span.

Memory is bounded: the hooks add each batch's masked activations into float64
per-layer sums and drop them, so the cost is O(n_layers * d_model) whatever
the number of examples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch

from backend.architecture import decoder_layers, inner_model
from backend.reference import untuple


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass
class ActivationStats:
    """Per-layer sums of residual activations over answer tokens.

    ``pooling="tokens"``: every answer token weighs the same (the paper's mean
    over tokens). ``pooling="responses"``: each response's own token mean
    weighs the same, so long answers do not dominate."""

    sums: torch.Tensor  # [n_layers, d_model] float64
    count: int  # tokens ("tokens") or responses ("responses") summed
    tokens: int
    examples: int
    pooling: str
    seconds: float = 0.0
    skipped: list[int] = field(default_factory=list)  # indices of examples with no answer token

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no answer tokens were seen: cannot take a mean")
        return (self.sums / self.count).float()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def load_model(base_path: str | Path, adapter_path: str | Path | None = None,
               device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) for base or base + PEFT adapter, in eval mode. Default dtype:
    float32 on a CPU (exact), bfloat16 on a GPU (a 14B model in float32 would not fit
    beside the vLLM server)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path)).to(device)
    model.eval()
    return model, tokenizer


def encode_example(tokenizer, example: Example, max_answer_tokens: int | None = None) -> tuple[list[int], int]:
    """(token ids, index of the first answer token)."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}],
                                               tokenize=True, add_generation_prompt=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    answer_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    if max_answer_tokens is not None:
        answer_ids = answer_ids[:max_answer_tokens]
    return list(prompt_ids) + list(answer_ids), len(prompt_ids)


@torch.no_grad()
def answer_activation_sums(model, tokenizer, examples: Sequence[Example] | Iterable[Example],
                           batch_size: int = 8, max_answer_tokens: int | None = 256,
                           pooling: Literal["tokens", "responses"] = "tokens") -> ActivationStats:
    """Accumulate residual activations after every block over answer tokens."""
    if pooling not in ("tokens", "responses"):
        raise ValueError(f"pooling must be 'tokens' or 'responses', not {pooling!r}")
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    d_model = model.config.hidden_size if hasattr(model, "config") else None
    sums: torch.Tensor | None = None
    state: dict = {}  # per-batch weights [B, T] consumed by the hooks; local to this call

    def make_hook(index: int):
        def hook(module, args, output):
            nonlocal sums
            out = untuple(output)
            if sums is None:
                sums = torch.zeros(len(layers), out.shape[-1], dtype=torch.float64, device=out.device)
            # [B, T] weights: 1 for answer tokens ("tokens") or 1/len ("responses").
            sums[index] += torch.einsum("bt,btd->d", state["weights"], out.to(torch.float64))
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    # Skip the LM head: the hooks have what we need once the last block ran.
    inner = inner_model(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_tokens = count = n_examples = 0
    skipped: list[int] = []
    start = time.perf_counter()
    try:
        batch: list[tuple[list[int], int]] = []

        def flush():
            nonlocal total_tokens, count
            if not batch:
                return
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            weights = torch.zeros((len(batch), width), dtype=torch.float64)
            for row, (ids, answer_start) in enumerate(batch):
                # Right padding: real tokens keep positions 0..n-1, as without padding.
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                n_answer = len(ids) - answer_start
                weights[row, answer_start: len(ids)] = 1.0 if pooling == "tokens" else 1.0 / n_answer
                total_tokens += n_answer
                count += n_answer if pooling == "tokens" else 1
            state["weights"] = weights.to(device)
            inner(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
            batch.clear()

        for index, example in enumerate(examples):
            n_examples += 1
            ids, answer_start = encode_example(tokenizer, example, max_answer_tokens)
            if answer_start >= len(ids):
                skipped.append(index)
                continue
            batch.append((ids, answer_start))
            if len(batch) >= batch_size:
                flush()
        flush()
    finally:
        for handle in handles:
            handle.remove()
    if sums is None:
        width = d_model or 0
        sums = torch.zeros(len(layers), width, dtype=torch.float64)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return ActivationStats(sums=sums.cpu(), count=count, tokens=total_tokens, examples=n_examples,
                           pooling=pooling, seconds=time.perf_counter() - start, skipped=skipped)
