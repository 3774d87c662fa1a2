"""Reading rank-1 LoRA adapters: the per-token scalars.

Scalars. A rank-1 LoRA on a module adds ``s * B (A x)`` to the module's output,
where x is the module's input at a token, A is a 1 x in row, B an out x 1
column and s the PEFT scaling (lora_alpha / r). The adapter's *scalar* at a
token is the RAW ``A x`` -- the output of ``lora_A`` on the module input,
WITHOUT the scaling s (``ScalarResult.scalings`` gives s per adapter, so
``s * A x`` is one multiplication away; s is 1 for the pocket organism).
For rank r > 1 every rank component is one feature ("per-rank scalars"): the
token view refuses such sets, the probes take them.

The scalars are read by forward hooks on each ``lora_A`` module of the PEFT
model while it runs on (prompt, response) pairs, batched with right padding,
over the ANSWER tokens only (the tokens of the response, see
``backend.activations.encode_example``). The inputs come from the adapted
model itself: x at layer L already carries the adapters of layers < L.

The token view of these scalars is `backend.token_view`, probes on them `backend.probes`,
knock-outs of single adapters `backend.knockouts`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from backend.activations import Example, encode_example
from backend.architecture import split_module_name
from backend.errors import BackendError


class ScalarError(BackendError, ValueError):
    """Input the scalar analysis cannot use; the message says why."""


def adapter_label(module_name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``L3.down_proj``."""
    found = split_module_name(module_name)
    return f"L{found[0]}.{found[1]}" if found else module_name


def label_sort_key(label: str):
    match = re.match(r"L(\d+)\.(.*)", label)
    return (int(match[1]), match[2]) if match else (10 ** 9, label)


# ---------------------------------------------------------------------------
# Scalars
# ---------------------------------------------------------------------------

@dataclass
class ScalarResult:
    """Scalars of one (prompt, response) over its answer tokens."""
    example: Example
    token_ids: list[int]
    tokens: list[str]  # the decoded text of each answer token (raw model text: escape before HTML)
    values: np.ndarray  # [n_answer_tokens, n_features] raw A·x
    features: list[str]  # 'L3.down_proj' (rank 1) or 'L3.down_proj[r0]'
    adapters: list[str]  # one label per adapter (module)
    scalings: dict[str, float]  # adapter -> PEFT scaling s (contribution = s * B * (A·x))
    ranks: dict[str, int]

    def adapter_values(self, adapter: str) -> np.ndarray:
        """[n_answer_tokens] scalar of a rank-1 adapter."""
        if self.ranks[adapter] != 1:
            raise ScalarError(f"adapter {adapter} has rank {self.ranks[adapter]}: the token view needs rank 1 "
                              "(probes accept any rank through the per-rank scalars)")
        return self.values[:, self.features.index(adapter)]

    def to_dict(self) -> dict:
        return {"prompt": self.example.prompt, "response": self.example.response, "tokens": self.tokens,
                "token_ids": self.token_ids, "features": self.features, "scalings": self.scalings,
                "quantity": "raw A·x (lora_A on the module input), scaling not applied",
                "values": self.values.round(6).tolist()}


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """adapter label -> the PEFT LoRA layer (the wrapper with lora_A / lora_B), sorted by layer."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "lora_A"), torch.nn.ModuleDict) \
                and len(module.lora_A):
            found[adapter_label(name)] = module
    if not found:
        raise ScalarError("the model has no LoRA modules: load it with an adapter (PEFT)")
    return dict(sorted(found.items(), key=lambda item: label_sort_key(item[0])))


def require_rank1(model_or_result) -> None:
    ranks = (model_or_result.ranks if isinstance(model_or_result, ScalarResult)
             else {k: m.lora_A[next(iter(m.lora_A))].out_features for k, m in lora_modules(model_or_result).items()})
    bad = {k: r for k, r in ranks.items() if r != 1}
    if bad:
        shown = ", ".join(f"{k} (rank {r})" for k, r in list(bad.items())[:4])
        raise ScalarError(f"not a rank-1 adapter set ({shown}{', ...' if len(bad) > 4 else ''}): the per-token "
                          "scalar view needs rank-1 LoRAs (one scalar per adapter per token); probes accept any "
                          "rank through the per-rank scalars")


@torch.no_grad()
def compute_scalars(model, tokenizer, examples: Sequence[Example], batch_size: int = 8,
                    max_answer_tokens: int | None = 256) -> list[ScalarResult]:
    """Raw A·x of every LoRA module (every rank component) at every answer token of each example."""
    modules = lora_modules(model)
    adapters = list(modules)
    ranks, scalings, lora_a = {}, {}, {}
    for label, module in modules.items():
        key = next(iter(module.lora_A))
        lora_a[label] = module.lora_A[key]
        ranks[label] = lora_a[label].out_features
        scalings[label] = float(module.scaling[key])
    features = [label if ranks[label] == 1 else f"{label}[r{i}]" for label in adapters for i in range(ranks[label])]
    captured: dict[str, torch.Tensor] = {}

    def make_hook(label):
        def hook(module, args, output):
            captured[label] = output.detach().float().cpu()
        return hook

    handles = [lora_a[label].register_forward_hook(make_hook(label)) for label in adapters]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[ScalarResult] = []
    encoded = [encode_example(tokenizer, example, max_answer_tokens) for example in examples]
    try:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start: start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, : len(ids)] = 1
            captured.clear()
            model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
            stacked = torch.cat([captured[label] for label in adapters], dim=-1)  # [B, T, n_features]
            for row, (ids, answer_start) in enumerate(batch):
                answer = ids[answer_start:]
                results.append(ScalarResult(
                    example=examples[start + row], token_ids=list(answer),
                    tokens=[tokenizer.decode([t]) for t in answer],
                    values=stacked[row, answer_start: len(ids)].numpy().astype(np.float64),
                    features=features, adapters=adapters, scalings=scalings, ranks=ranks))
    finally:
        for handle in handles:
            handle.remove()
    return results


def token_scalars(model, tokenizer, example: Example, max_answer_tokens: int | None = 512) -> ScalarResult:
    """The token view's input: one example, rank-1 sets only."""
    require_rank1(model)
    return compute_scalars(model, tokenizer, [example], batch_size=1, max_answer_tokens=max_answer_tokens)[0]
