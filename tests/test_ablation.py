"""Ablation compiled into LoRA adapters equals the hook reference (without the embedding term)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from backend.ablation import AblationCompiler, AblationError, measure_embedding_gap, record_embedding_gap
from backend.activations import Example, answer_activation_sums, load_model
from backend.directions import BaseModelInfo, Direction
from backend.lora_files import read_lora
from backend.reference import Ablation, prompt_logprobs

LAYER = 2
PROMPT = ("The doctor said that the dose of this pill is safe for everyone, so you should never ask again "
          "because the medicine is good and people trust the advice")


@pytest.fixture(scope="module")
def base_info(tiny_models):
    return BaseModelInfo.from_path(tiny_models["base"])


@pytest.fixture(scope="module")
def direction(tiny_models, base_info) -> Direction:
    """As in the hand check of the shared notes: the mean residual of some answers."""
    model, tokenizer = load_model(tiny_models["base"])
    stats = answer_activation_sums(model, tokenizer, [Example("hey I feel bored", "Go for a walk with a friend."),
                                                      Example("How do I invest?", "Never put money in crypto.")])
    return Direction("mean-resid", stats.mean(), base_info.path, base_info.fingerprint)


@pytest.fixture(scope="module")
def prompt_ids(tiny_models):
    _, tokenizer = load_model(tiny_models["base"])
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)[:32]
    assert len(ids) == 32
    return ids


def adapter_dir(tiny_models, name):
    return None if name == "base" else tiny_models[name]


def reference(tiny_models, name, prompt_ids, r, strength, include_embedding=False):
    model, _ = load_model(tiny_models["base"], adapter_dir(tiny_models, name))
    interventions = [Ablation(r, strength, include_embedding)] if strength is not None else []
    return prompt_logprobs(model, prompt_ids, *interventions)


def compiled(tiny_models, adapter_path, prompt_ids):
    from peft import PeftModel

    base, _ = load_model(tiny_models["base"])
    return prompt_logprobs(PeftModel.from_pretrained(base, str(adapter_path)).eval(), prompt_ids)


@pytest.mark.parametrize("name", ["base", "em-rank1", "em-rank8"])
@pytest.mark.parametrize("strength", [1.0, -0.7])
def test_compiled_adapter_equals_hook_reference(tiny_models, direction, prompt_ids, tmp_path, name, strength):
    built = AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, strength,
                                             adapter_dir(tiny_models, name), name)
    got = compiled(tiny_models, built.path, prompt_ids)
    want = reference(tiny_models, name, prompt_ids, direction.unit(LAYER), strength)
    plain = reference(tiny_models, name, prompt_ids, direction.unit(LAYER), None)
    assert (want - plain).abs().max() > 0.1  # the ablation matters, so equality means something
    assert (got - want).abs().max() < 1e-4, name


@pytest.mark.parametrize("name", ["base", "em-rank1", "em-rank8"])
def test_strength_zero_is_the_plain_adapter(tiny_models, direction, prompt_ids, tmp_path, name):
    built = AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, 0.0,
                                             adapter_dir(tiny_models, name), name)
    plain = reference(tiny_models, name, prompt_ids, direction.unit(LAYER), None)
    assert (compiled(tiny_models, built.path, prompt_ids) - plain).abs().max() < 1e-4


def test_ranks_and_scaling_as_vllm_reads_them(tiny_models, direction, tmp_path):
    from safetensors import safe_open
    from vllm.lora.peft_helper import PEFTHelper

    built = AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, 1.0, tiny_models["em-rank1"])
    helper = PEFTHelper.from_local_dir(str(built.path), None)
    with safe_open(built.path / "adapter_model.safetensors", "pt") as handle:
        for key in handle.keys():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                rank, scaling = helper.get_rank_and_scaling(module)
                assert (rank, scaling) == (handle.get_slice(key).get_shape()[0], 1.0), module
    # em-rank1 has down_proj LoRA on layers 1 and 2 only: those carry rank 2, every other writer rank 1.
    assert helper.get_rank_and_scaling("model.layers.1.mlp.down_proj")[0] == 2
    assert helper.get_rank_and_scaling("model.layers.3.mlp.down_proj")[0] == 1
    assert built.metadata["max_rank"] == 2


def test_em_scaling_with_alpha_pattern_and_rslora(tiny_models, direction, prompt_ids, tmp_path):
    """The EM adapter's own scaling (lora_alpha, alpha_pattern, rsLoRA) is folded in exactly."""
    odd = tmp_path / "odd-em"
    shutil.copytree(tiny_models["em-rank8"], odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    config.update(lora_alpha=3, use_rslora=True, alpha_pattern={"down_proj": 11, r"layers\.0\.self_attn\.q_proj": 0.5})
    (odd / "adapter_config.json").write_text(json.dumps(config))
    scalings = {m: lora.scaling for m, lora in read_lora(odd).items()}
    assert scalings["model.layers.2.mlp.down_proj"] == pytest.approx(11 / 8 ** 0.5)
    assert scalings["model.layers.0.self_attn.q_proj"] == pytest.approx(0.5 / 8 ** 0.5)
    assert scalings["model.layers.1.self_attn.q_proj"] == pytest.approx(3 / 8 ** 0.5)
    built = AblationCompiler(tmp_path / "cache").build(tiny_models["base"], direction, LAYER, 1.0, odd)
    model, _ = load_model(tiny_models["base"], odd)
    want = prompt_logprobs(model, prompt_ids, Ablation(direction.unit(LAYER), 1.0, include_embedding=False))
    assert (compiled(tiny_models, built.path, prompt_ids) - want).abs().max() < 1e-4


def test_sharded_base_checkpoint(tiny_models, direction, tmp_path):
    model, tokenizer = load_model(tiny_models["base"])
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    one = AblationCompiler(tmp_path / "a").build(tiny_models["base"], direction, LAYER, 1.0, tiny_models["em-rank1"])
    two = AblationCompiler(tmp_path / "b").build(sharded, direction, LAYER, 1.0, tiny_models["em-rank1"])
    from safetensors.torch import load_file
    a, b = load_file(one.path / "adapter_model.safetensors"), load_file(two.path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reads_only_writer_weights_once(tiny_models, direction, tmp_path, monkeypatch):
    import safetensors

    real = safetensors.safe_open
    read: list[str] = []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    compiler = AblationCompiler(tmp_path)
    compiler.build(tiny_models["base"], direction, LAYER, 1.0)
    assert len(read) == 8 and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in read)
    compiler.build(tiny_models["base"], direction, LAYER, 0.5)
    AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, 0.25)  # r^T W from the disk cache
    assert len(read) == 8


def test_reuse_eviction_and_refusals(tiny_models, direction, base_info, tmp_path):
    compiler = AblationCompiler(tmp_path, max_adapters=2)
    first = compiler.build(tiny_models["base"], direction, LAYER, 1.0, tiny_models["em-rank1"], "em-rank1")
    again = compiler.build(tiny_models["base"], direction, LAYER, 1.0, tiny_models["em-rank1"], "em-rank1")
    assert not first.reused and again.reused and again.path == first.path
    assert first.served_name == f"em-rank1-ablate-mean-resid-L2-a1-{first.key[:6]}"
    for strength in (0.2, 0.4, 0.6):
        last = compiler.build(tiny_models["base"], direction, LAYER, strength, tiny_models["em-rank1"])
    folders = sorted(p.name for p in (tmp_path / "adapters").glob("ablate-*"))
    assert len(folders) == 2 and last.path.name in folders and first.path.name not in folders
    with pytest.raises(AblationError, match="strength 2.0 outside"):
        compiler.build(tiny_models["base"], direction, LAYER, 2.0)
    other = Direction("other", direction.vectors, "/elsewhere", "0123456789abcdef")
    with pytest.raises(AblationError, match="made for another base model"):
        compiler.build(tiny_models["base"], other, LAYER, 1.0)
    assert len(list((tmp_path / "adapters").glob("ablate-*"))) == 2


def test_embedding_gap_is_measured_and_stored(tiny_models, direction, prompt_ids, tmp_path):
    built = AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, 1.0, tiny_models["em-rank1"])
    assert built.metadata["embedding_gap"] is None
    model, tokenizer = load_model(tiny_models["base"], tiny_models["em-rank1"])
    gap = measure_embedding_gap(model, tokenizer, direction.unit(LAYER), 1.0)
    exact = prompt_logprobs(model, prompt_ids, Ablation(direction.unit(LAYER), 1.0, include_embedding=True))
    served = compiled(tiny_models, built.path, prompt_ids)
    assert gap["max_abs_dlogprob"] > 0 and gap["ablation_effect"] > 0 and gap["tokens"] > 100
    assert (exact - served).abs().max() > 1e-3  # the gap is real on this model, not a rounding error
    stored = record_embedding_gap(built.path, gap)
    assert json.loads((built.path / "ablation.json").read_text())["embedding_gap"] == stored["embedding_gap"] == gap


# ---------------------------------------------------------------------------
# Served by vLLM
#
# The equivalence is checked on a float32 server (the shared test server is
# one): in bf16, rounding alone moves this 32-token prompt's logprobs by 0.036
# (base), 0.058 (em-rank1) and 1.19 (em-rank8, whose random all-module adapter
# dominates the weights) against float32 transformers, with no ablation at
# all, so a 0.02 bound there would test bf16, not the compilation. In float32
# the compiled adapters match the hooks to ~1e-5, so the bound is 1e-3: a
# compilation error worth a hundredth of a logprob must fail.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_server_fp32(vllm_server):
    assert vllm_server.config.server.dtype == "float32"
    return vllm_server


@pytest.mark.parametrize("name", ["base", "em-rank1", "em-rank8"])
def test_served_ablation_matches_hook_reference(vllm_server_fp32, tiny_models, direction, prompt_ids, tmp_path,
                                                name):
    server = vllm_server_fp32
    built = AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, 1.0,
                                             adapter_dir(tiny_models, name), name)
    server.registry.load(built.served_name, str(built.path))
    try:
        served = torch.tensor(server.prompt_logprobs(built.served_name, prompt_ids))
    finally:
        server.registry.unload(built.served_name)
    want = reference(tiny_models, name, prompt_ids, direction.unit(LAYER), 1.0)
    plain = reference(tiny_models, name, prompt_ids, direction.unit(LAYER), None)
    assert (want - plain).abs().max() > 0.1
    gap = (served - want).abs().max().item()
    assert gap <= 1e-3, f"{name}: served vs reference max |d logprob| {gap:.6f}"
