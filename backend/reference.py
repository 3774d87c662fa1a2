"""Exact reference engine: ablation and steering through forward hooks in transformers.

Layer convention used across the project: "layer L" (0-based) is the residual
stream AFTER decoder block L, i.e. the output of ``model.layers[L]``. With
``output_hidden_states=True`` that is ``hidden_states[L + 1]`` for L < n-1; the
last entry of ``hidden_states`` has the final norm applied and is NOT the
residual stream, which is why this module hooks decoder blocks instead.

Ablation of unit vector r with strength a replaces the output of every module
that writes into the residual stream (token embedding, each block's
``self_attn.o_proj`` and ``mlp.down_proj``) by ``out - a (out . r) r``. Since
the residual stream is the sum of those outputs, this projects r out of it at
every layer. ``include_embedding=False`` leaves the embedding's write alone:
that is exactly what a compiled LoRA adapter served by vLLM computes (vLLM
cannot put LoRA on ``embed_tokens``), so it is the reference for those.
Which modules these are is ``backend.architecture``'s business. Hooks change
module outputs, never weights: with tied embeddings the unembedding (the same
matrix as the embedding) is untouched by an ablation that includes the embedding.

The paper's scripts ablate at ONE layer instead: ``Ablation(..., layer=L)``
projects r out of the residual stream after block L only (the output of
``model.layers[L]``, at every position), leaving every block up to and
including L as it was. That cannot be compiled into a LoRA adapter: the
residual after block L is the input of no LoRA module, and projecting the
writers of blocks <= L would also change what those blocks see. So it runs
here, like steering.

Steering adds ``c * v`` to the residual stream after one block, at every
position or only at generated positions. Steering is NOT available on the vLLM
server: a LoRA computes ``B A x`` and cannot add a constant vector, vLLM's LoRA
has no bias, and vLLM's prompt-embeds input only reaches the embedding layer of
the prompt, not layer L of generated tokens. A constant bias baked into a copy
of the base checkpoint would be exact but needs an architecture with an
``o_proj`` bias (Qwen2 has none) and a separate served model per (vector,
strength). So steering runs here, on the reference engine, and the UI has to
say so.

Hooks are attached only inside context managers (``ablate``, ``steer``,
``intervene``) that remove them on exit, including on exceptions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
from torch import nn

from backend.architecture import decoder_layers, embedding, residual_writers


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


# ---------------------------------------------------------------------------
# Interventions
# ---------------------------------------------------------------------------

def _unit(vector: torch.Tensor | Sequence[float], what: str) -> torch.Tensor:
    v = torch.as_tensor(vector, dtype=torch.float32).detach().flatten()
    norm = torch.linalg.vector_norm(v)
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"{what}: vector has zero or non-finite norm ({norm.item()})")
    return v / norm


@dataclass(frozen=True)
class Ablation:
    """Project unit(direction) out of the residual stream: at every layer (``layer=None``,
    through every writer), or only after block ``layer`` (the paper's single-layer form)."""

    direction: torch.Tensor
    strength: float = 1.0
    include_embedding: bool = True
    layer: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "direction", _unit(self.direction, "Ablation.direction"))


@dataclass(frozen=True)
class Steering:
    """Add ``coefficient * vector`` to the residual stream after block ``layer``.

    The vector is used as given (not normalised) so that a mean-diff direction
    at coefficient 1 adds exactly the mean difference; pass a unit vector to
    make the coefficient a norm. ``positions="generated"`` steers only
    positions at index >= ``prompt_length`` (set by ``generate``)."""

    vector: torch.Tensor
    layer: int
    coefficient: float = 1.0
    positions: Literal["all", "generated"] = "all"

    def __post_init__(self):
        v = torch.as_tensor(self.vector, dtype=torch.float32).detach().flatten()
        if not torch.isfinite(v).all():
            raise ValueError("Steering.vector contains NaN or inf")
        object.__setattr__(self, "vector", v)
        if self.positions not in ("all", "generated"):
            raise ValueError(f"Steering.positions must be 'all' or 'generated', not {self.positions!r}")


def _project_out_hook(r: torch.Tensor, strength: float):
    def hook(module, args, output):
        out = _output_tensor(output)
        rr = r.to(device=out.device, dtype=out.dtype)
        return _replace_output(output, out - strength * (out @ rr).unsqueeze(-1) * rr)
    return hook


@contextlib.contextmanager
def ablate(model: nn.Module, ablation: Ablation) -> Iterator[None]:
    """Apply ``ablation`` inside the ``with`` block; hooks are always removed."""
    handles = []
    try:
        r = ablation.direction
        d_model = embedding(model).weight.shape[1]
        if r.numel() != d_model:
            raise ValueError(f"Ablation.direction has width {r.numel()}, the model's residual stream is {d_model}")
        hook = _project_out_hook(r, float(ablation.strength))
        if ablation.layer is not None:
            layers = decoder_layers(model)
            if not 0 <= ablation.layer < len(layers):
                raise ValueError(f"Ablation.layer {ablation.layer} out of range: the model has {len(layers)} layers")
            handles.append(layers[ablation.layer].register_forward_hook(hook))
        else:
            if ablation.include_embedding:
                handles.append(embedding(model).register_forward_hook(hook))
            for _, module in residual_writers(model):
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def steer(model: nn.Module, steering: Steering, prompt_length: int | None = None) -> Iterator[None]:
    """Apply ``steering`` inside the ``with`` block; the hook is always removed.

    For ``positions="generated"`` the absolute position of each token is the
    KV-cache length before this forward call plus its index in the call, so
    the rule is exact with and without a cache and needs no mutable counter.
    """
    layers = decoder_layers(model)
    if not 0 <= steering.layer < len(layers):
        raise ValueError(f"Steering.layer {steering.layer} out of range: the model has {len(layers)} layers")
    if steering.positions == "generated" and prompt_length is None:
        raise ValueError("Steering with positions='generated' needs prompt_length (use reference.generate)")
    layer_index = steering.layer

    def hook(module, args, kwargs, output):
        out = _output_tensor(output)
        add = (steering.coefficient * steering.vector).to(device=out.device, dtype=out.dtype)
        if add.numel() != out.shape[-1]:
            raise ValueError(f"Steering.vector has width {add.numel()}, the residual stream is {out.shape[-1]}")
        if steering.positions == "all":
            return _replace_output(output, out + add)
        cache = kwargs.get("past_key_values")
        seq = out.shape[-2]
        # The cache already holds this call's tokens when the block returns.
        after = cache.get_seq_length(layer_index) if cache is not None else seq
        start = after - seq
        positions = torch.arange(start, start + seq, device=out.device)
        mask = (positions >= prompt_length).to(out.dtype).unsqueeze(-1)
        return _replace_output(output, out + mask * add)

    handle = layers[layer_index].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def intervene(model: nn.Module, *interventions: Ablation | Steering,
              prompt_length: int | None = None) -> Iterator[None]:
    """Several interventions at once (applied in order)."""
    with contextlib.ExitStack() as stack:
        for item in interventions:
            if isinstance(item, Ablation):
                stack.enter_context(ablate(model, item))
            elif isinstance(item, Steering):
                stack.enter_context(steer(model, item, prompt_length))
            else:
                raise TypeError(f"not an intervention: {type(item).__name__}")
        yield


# ---------------------------------------------------------------------------
# Helpers for comparisons
# ---------------------------------------------------------------------------

@torch.no_grad()
def prompt_logprobs(model: nn.Module, input_ids: torch.Tensor | Sequence[int],
                    *interventions: Ablation | Steering, prompt_length: int = 0) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1..T-1 of one token sequence, float32 [T-1].

    Same quantity as vLLM's ``prompt_logprobs`` for the prompt's own tokens.
    ``prompt_length`` only matters for ``Steering(positions="generated")``:
    positions at index >= it count as generated."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    device = next(model.parameters()).device
    ids = ids.to(device)
    with intervene(model, *interventions, prompt_length=prompt_length):
        logits = model(input_ids=ids, use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    return logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1).cpu()


@dataclass
class Generation:
    prompts: list[str]
    completions: list[str]
    token_ids: list[list[int]] = field(repr=False)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *interventions: Ablation | Steering,
             max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
             chat: bool = True) -> Generation:
    """Generate for a batch of user prompts (chat template applied when ``chat``),
    left-padded so that every generated position sits at index >= the padded
    prompt length, which is what ``Steering(positions="generated")`` keys on."""
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = previous_side
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    prompt_length = batch["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature)
    else:
        kwargs.update(do_sample=False)
    with intervene(model, *interventions, prompt_length=prompt_length):
        out = model.generate(**batch, **kwargs)
    new = out[:, prompt_length:].tolist()
    eos = tokenizer.eos_token_id
    trimmed = [ids[: ids.index(eos)] if eos in ids else ids for ids in new]
    return Generation(list(prompts), tokenizer.batch_decode(trimmed, skip_special_tokens=True), trimmed)
