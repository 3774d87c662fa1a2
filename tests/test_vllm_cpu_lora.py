"""The grouped CPU LoRA path (backend/vllm_cpu_lora.py) against vLLM's own, without a server.

The served equivalence (vLLM against transformers + PEFT, prefill and decode, adapters mixed in
one batch) is in test_real_model.py and test_lora_modules.py, which run on servers that use it."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from backend.serving import GROUPED_CPU_LORA_EXTENSION, vllm_command

PunicaWrapperCPU = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu").PunicaWrapperCPU
VLLM_ADD_LORA_LINEAR = PunicaWrapperCPU.add_lora_linear  # saved before the import below patches them
VLLM_ADD_LORA_LOGITS = PunicaWrapperCPU.add_lora_logits

from backend import vllm_cpu_lora  # noqa: E402

SLOTS, RANK, WIDTH, OUTPUTS = 5, 8, 64, (96, 32, 32)  # a packed qkv-like layer of three slices
SLOT_OF_TOKEN = [-1, -1, 0, 0, 0, 2, 3, 3, -1, 1]  # -1: no adapter; a prefill's requests are contiguous


def stacked(last_slot_empty: bool):
    generator = torch.Generator().manual_seed(0)
    lora_a = tuple(torch.randn(SLOTS, 1, RANK, WIDTH, generator=generator) for _ in OUTPUTS)
    lora_b = tuple(torch.randn(SLOTS, 1, out, RANK, generator=generator) for out in OUTPUTS)
    if last_slot_empty:
        for weights in (*lora_a, *lora_b):
            weights[-1].zero_()
    return lora_a, lora_b


def wrapper(prefill: bool) -> PunicaWrapperCPU:
    punica = PunicaWrapperCPU(64, 8, "cpu")
    slots = torch.tensor(SLOT_OF_TOKEN)
    punica._token_lora_indices[: len(slots)].copy_(slots)
    punica.indices_len = [len(slots)] * 4
    punica.is_prefill = prefill
    if prefill:
        punica._update_prefill_metadata(slots)
    return punica


def test_importing_the_extension_patches_the_cpu_wrapper():
    assert PunicaWrapperCPU.add_lora_linear is vllm_cpu_lora.grouped_add_lora_linear
    assert PunicaWrapperCPU.add_lora_logits is vllm_cpu_lora.grouped_add_lora_logits
    module, _, name = GROUPED_CPU_LORA_EXTENSION.rpartition(".")
    assert module == vllm_cpu_lora.__name__ and hasattr(vllm_cpu_lora, name)


def describe(groups):
    return [(slot, (where.start, where.stop) if isinstance(where, slice) else where.tolist()) for slot, where in groups]


def test_tokens_are_grouped_by_adapter_and_tokens_without_one_are_dropped():
    assert describe(vllm_cpu_lora.adapter_groups(torch.tensor(SLOT_OF_TOKEN))) == [
        (0, (2, 5)), (2, (5, 6)), (3, (6, 8)), (1, (9, 10))]
    # a decode step of interleaved requests: one group per adapter, its tokens picked by index
    assert describe(vllm_cpu_lora.adapter_groups(torch.tensor([0, 1, -1, 0, 1, 1]))) == [
        (0, [0, 3]), (1, [1, 4, 5])]
    assert vllm_cpu_lora.adapter_groups(torch.tensor([-1, -1])) == []
    assert vllm_cpu_lora.adapter_groups(torch.tensor([], dtype=torch.long)) == []


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_grouped_equals_vllms_own_ops_when_the_last_slot_is_empty(prefill):
    lora_a, lora_b = stacked(last_slot_empty=True)
    x = torch.randn(len(SLOT_OF_TOKEN), WIDTH, generator=torch.Generator().manual_seed(1))
    y = torch.randn(len(SLOT_OF_TOKEN), sum(OUTPUTS), generator=torch.Generator().manual_seed(2))
    theirs, ours = y.clone(), y.clone()
    VLLM_ADD_LORA_LINEAR(wrapper(prefill), theirs, x, lora_a, lora_b, 1.0, OUTPUTS)
    vllm_cpu_lora.grouped_add_lora_linear(wrapper(prefill), ours, x, lora_a, lora_b, 1.0, OUTPUTS)
    assert (ours - y).abs().max() > 1  # the adapters did something, so equality means something
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_tokens_without_an_adapter_are_untouched_when_every_slot_is_taken():
    """The mechanism of the CPU wrong-adapter fault: vLLM's ops index slot -1 as the last slot,
    so a base token gets the last adapter once that slot is filled; the grouped path skips it."""
    lora_a, lora_b = stacked(last_slot_empty=False)
    x = torch.randn(len(SLOT_OF_TOKEN), WIDTH, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(len(SLOT_OF_TOKEN), sum(OUTPUTS))
    theirs, ours = y.clone(), y.clone()
    VLLM_ADD_LORA_LINEAR(wrapper(False), theirs, x, lora_a, lora_b, 1.0, OUTPUTS)
    vllm_cpu_lora.grouped_add_lora_linear(wrapper(False), ours, x, lora_a, lora_b, 1.0, OUTPUTS)
    base_tokens = [i for i, slot in enumerate(SLOT_OF_TOKEN) if slot < 0]
    assert ours[base_tokens].abs().max() == 0
    assert theirs[base_tokens].abs().max() > 1


def by_hand(x, y, layout, lora_a, lora_b):
    """y[t, slice_i] += x[t] @ A_i[slot]^T @ B_i[slot]^T, token by token, for tokens with a slot."""
    expected = y.clone()
    for token, slot in enumerate(layout):
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(lora_a, lora_b, OUTPUTS):
            expected[token, offset:offset + size] += (x[token] @ a[slot, 0].T) @ b[slot, 0].T
            offset += size
    return expected


def test_a_prefill_beside_interleaved_decodes_computes_only_the_adapter_rows():
    """A judge prompt's prefill (no adapter) in the same step as decodes of adapter requests:
    the masked product runs over the adapter rows only, and gives the by-hand result."""
    lora_a, lora_b = stacked(last_slot_empty=True)
    layout = [0, 1, 0, 2] + [-1] * vllm_cpu_lora.GATHER_ABOVE + [1, 0]
    punica = PunicaWrapperCPU(128, 8, "cpu")
    punica._token_lora_indices[: len(layout)].copy_(torch.tensor(layout))
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(len(layout), WIDTH, generator=generator)
    y = torch.randn(len(layout), sum(OUTPUTS), generator=generator)
    _, _, mask, rows = vllm_cpu_lora._MEMO.stacked_slots(
        lora_a, lora_b, [(slot, where, vllm_cpu_lora._MEMO.merged_slot(lora_a, lora_b, list(OUTPUTS), slot))
                         for slot, where in vllm_cpu_lora.adapter_groups(torch.tensor(layout))], len(layout))
    assert rows.tolist() == [0, 1, 2, 3, len(layout) - 2, len(layout) - 1] and mask.shape[0] == 6
    ours = y.clone()
    vllm_cpu_lora.grouped_add_lora_linear(punica, ours, x, lora_a, lora_b, 1.0, OUTPUTS)
    assert torch.allclose(ours, by_hand(x, y, layout, lora_a, lora_b), rtol=1e-5, atol=1e-4)
    assert torch.equal(ours[4:-2], y[4:-2])


def logits_wrapper(rows: list[int]) -> PunicaWrapperCPU:
    punica = PunicaWrapperCPU(64, 8, "cpu")
    punica._sampler_indices[: len(rows)].copy_(torch.tensor(rows))
    punica.indices_len = [len(rows)] * 4
    return punica


def test_logits_lora_equals_vllms_and_skips_adapters_without_lm_head():
    generator = torch.Generator().manual_seed(5)
    vocab, rows = 100, [1, -1, 0, 1, 2]  # one sampled row per request; slot 2 targets no lm_head
    lora_a = torch.randn(SLOTS, 1, RANK, WIDTH, generator=generator)
    lora_b = torch.randn(SLOTS, 1, vocab, RANK, generator=generator)
    lora_a[2].zero_(), lora_b[2].zero_(), lora_a[-1].zero_(), lora_b[-1].zero_()  # as vLLM resets a slot
    x = torch.randn(len(rows), WIDTH, generator=generator)
    logits = torch.randn(len(rows), vocab, generator=generator)
    theirs, ours = logits.clone(), logits.clone()
    VLLM_ADD_LORA_LOGITS(logits_wrapper(rows), theirs, x, lora_a, lora_b, 1.0)
    vllm_cpu_lora.grouped_add_lora_logits(logits_wrapper(rows), ours, x, lora_a, lora_b, 1.0)
    assert (ours - logits).abs().max() > 1
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours[[1, 4]], logits[[1, 4]])  # no adapter, and an adapter without lm_head


def test_one_compiled_graph_serves_every_later_batch_of_adapters():
    """vllm-cpu traces the model once and then drops dynamo's guards (DYNAMO_TRACE_ONCE), so
    whatever the LoRA path reads in Python while tracing would stay fixed for every later batch.
    One graph, compiled for the first batch, must give the by-hand result for batches of other
    lengths and adapter layouts, and after a slot's weights are replaced in place; with
    error_on_recompile a guard that would have needed a new graph fails the test."""
    lora_a, lora_b = stacked(last_slot_empty=True)
    punica = wrapper(prefill=False)
    lora_a[1][2].zero_()  # slot 2's adapter leaves the second slice alone
    for weights in lora_a:
        weights[3].zero_()  # and slot 3's the whole module, as an adapter without it

    def layer(x, y):
        vllm_cpu_lora.grouped_add_lora_linear(punica, y, x, lora_a, lora_b, 1.0, OUTPUTS)
        return y * 1.0

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    generator = torch.Generator().manual_seed(3)
    layouts = [SLOT_OF_TOKEN, [1, 1, 1], [-1, -1, -1, -1], [3, -1, 0, 0, 2], [2, 2], [0, 1, 2, 3, 0, 1], [2, -1, 3, 2]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step, layout in enumerate(layouts):
            if step == 4:  # new adapters loaded into slots 2 and 3, in place as vLLM does
                lora_b[0][2].normal_(generator=generator)
                lora_a[1][2].normal_(generator=generator)
                lora_a[0][3].normal_(generator=generator)
            punica._token_lora_indices[: len(layout)].copy_(torch.tensor(layout))
            x = torch.randn(len(layout), WIDTH, generator=generator)
            y = torch.randn(len(layout), sum(OUTPUTS), generator=generator)
            expected = by_hand(x, y, layout, lora_a, lora_b)
            assert torch.allclose(compiled(x, y.clone()), expected, rtol=1e-5, atol=1e-4), layout


def test_the_server_command_names_the_extension_only_when_asked(tmp_path):
    from conftest import write_config

    for kernels, expected in (("grouped", True), ("vllm", False)):
        config = write_config(tmp_path / kernels, tmp_path, {}, 8000, cpu_lora_kernels=kernels,
                              cpu_compile=kernels == "grouped")
        argv, env = vllm_command(config, 8000, "cpu")
        assert ("--worker-extension-cls" in argv) is expected, kernels
        assert (GROUPED_CPU_LORA_EXTENSION in argv) is expected
        assert (str(vllm_cpu_lora.__file__).rsplit("/backend/", 1)[0] in env.get("PYTHONPATH", "")) is expected
        gpu_argv, _ = vllm_command(config, 8000, "cuda")
        assert "--worker-extension-cls" not in gpu_argv  # a GPU build has its own kernels


def test_the_cpu_server_binds_every_core_unless_told_otherwise(tmp_path, monkeypatch):
    from conftest import write_config

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    cores = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    _, env = vllm_command(write_config(tmp_path / "all", tmp_path, {}, 8000), 8000, "cpu")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == cores and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    _, env = vllm_command(write_config(tmp_path / "auto", tmp_path, {}, 8000, cpu_thread_binding="vllm-auto"),
                          8000, "cpu")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in env
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")  # the user's environment wins
    _, env = vllm_command(write_config(tmp_path / "mine", tmp_path, {}, 8000), 8000, "cpu")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_the_cpu_server_is_compiled_through_the_grouped_module_unless_told_otherwise(tmp_path):
    from conftest import write_config

    compiled, env = vllm_command(write_config(tmp_path / "on", tmp_path, {}, 8000), 8000, "cpu")
    assert env["VLLM_USE_AOT_COMPILE"] == "0"  # vllm-cpu's AOT cache did not load back: every start compiled
    code = compiled[compiled.index("-c") + 1]
    assert compiled[0] == sys.executable and "-m" not in compiled[:3]
    assert f"from {vllm_cpu_lora.__name__} import {vllm_cpu_lora.run_compiled_openai_server.__name__}" in code
    eager, _ = vllm_command(write_config(tmp_path / "off", tmp_path, {}, 8000, cpu_compile=False), 8000, "cpu")
    assert eager[1:3] == ["-m", vllm_cpu_lora.OPENAI_SERVER_MODULE]
    gpu, _ = vllm_command(write_config(tmp_path / "gpu", tmp_path, {}, 8000), 8000, "cuda")
    assert gpu[1:3] == ["-m", vllm_cpu_lora.OPENAI_SERVER_MODULE]  # a GPU build compiles with LoRA itself
    assert compiled[3:] == eager[3:]  # the same server arguments either way


def test_compiling_with_vllms_own_lora_ops_is_refused_by_name(tmp_path):
    from conftest import write_config

    from backend.config import ConfigError

    with pytest.raises(ConfigError, match=r"cpu_compile.*cpu_lora_kernels = \"grouped\""):
        write_config(tmp_path, tmp_path, {}, 8000, cpu_lora_kernels="vllm")


def test_the_cpu_server_caches_prefixes_in_blocks_of_32_tokens(tmp_path):
    """The prefix cache keeps whole blocks: with vllm-cpu's 128 a judge prompt's later requests
    computed up to 127 tokens again. A block size that is no multiple of 32 is refused by name."""
    from backend.config import ConfigError
    from conftest import write_config

    argv, _ = vllm_command(write_config(tmp_path / "default", tmp_path, {}, 8000), 8000, "cpu")
    assert argv[argv.index("--block-size") + 1] == "32"
    argv, _ = vllm_command(write_config(tmp_path / "128", tmp_path, {}, 8000, cpu_block_size=128), 8000, "cpu")
    assert argv[argv.index("--block-size") + 1] == "128"
    assert "--block-size" not in vllm_command(write_config(tmp_path / "gpu", tmp_path, {}, 8000), 8000, "cuda")[0]
    with pytest.raises(ConfigError, match="cpu_block_size"):
        write_config(tmp_path / "odd", tmp_path, {}, 8000, cpu_block_size=48)


def test_the_memo_keeps_one_side_by_side_product_per_module():
    """A long-running server sees many combinations of adapters; each module keeps the latest one."""
    lora_a, lora_b = stacked(last_slot_empty=True)
    memo = vllm_cpu_lora._StepMemo()
    for layout in ([0, 1, 0, 1], [1, 2, 1, 2], [0, 2, 3, 0]):
        used = [(slot, where, memo.merged_slot(lora_a, lora_b, list(OUTPUTS), slot))
                for slot, where in vllm_cpu_lora.adapter_groups(torch.tensor(layout))]
        a_side, b_stacked, _, _ = memo.stacked_slots(lora_a, lora_b, used, len(layout))
        assert torch.equal(a_side, torch.cat([pair[0] for _, _, pair in used], dim=1)), layout
        assert torch.equal(b_stacked, torch.cat([pair[1] for _, _, pair in used], dim=0)), layout
    assert len(memo.side_by_side) == 1
