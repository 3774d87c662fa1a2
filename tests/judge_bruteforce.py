"""Brute-force number probabilities in transformers, the reference for the multi-token judge.

For every integer n in 0..100: the teacher-forced probability of n's tokens right after the
chat-templated judge prompt, times the probability that the next token does not begin with
a digit (the number ends there). Independent of backend.judge's tree: every number is
scored on its own, from the full vocabulary rather than top-20 lists, and no pruning.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=2)
def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    digit_ids = torch.tensor([i for i, text in enumerate(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
                              if text[:1].isascii() and text[:1].isdigit()])
    return tokenizer, model, digit_ids


@torch.no_grad()
def number_probabilities(path: str, prompt: str) -> dict[int, float]:
    """{n: P(n)} for n in 0..100 (float32, all 101 numbers in one batch)."""
    tokenizer, model, digit_ids = load(path)
    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False))
    numbers = [tokenizer.encode(str(n), add_special_tokens=False) for n in range(101)]
    width = max(len(ids) for ids in numbers)
    prompt = model(torch.tensor([prompt_ids]), use_cache=True)
    first = prompt.logits[:, -1:].log_softmax(-1).expand(len(numbers), 1, -1)
    cache = prompt.past_key_values
    cache.batch_repeat_interleave(len(numbers))
    # Right padding: with causal attention, the positions of a number's own tokens never see
    # the padding after them, so no attention mask is needed for what is read.
    batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in numbers])
    rest = model(batch, past_key_values=cache).logits.log_softmax(-1)
    logprobs = torch.cat([first, rest], dim=1)  # [number, position, vocab]: position k predicts token k
    probs: dict[int, float] = {}
    for n, ids in enumerate(numbers):
        logprob = sum(logprobs[n, k, ids[k]].item() for k in range(len(ids)))
        end = 1.0 - logprobs[n, len(ids)].exp()[digit_ids].sum().item()
        probs[n] = float(torch.tensor(logprob, dtype=torch.float64).exp().item() * end)
    return probs
