"""backend.architecture: Qwen2 and Llama found through one module, unsupported models refused by name,
and nothing in the intervention paths can touch a tied unembedding."""
from __future__ import annotations

import json

import pytest
import torch

from backend import architecture as A
from backend.activations import load_model
from backend.lora_files import check_compatible, read_adapter_files, write_lora
from backend.directions import BaseModelInfo, Direction, safetensors_index
from backend.reference import Ablation, Steering, ablate, prompt_logprobs, steer
from backend.testmodels import build_lora
from test_reference import residuals


@pytest.fixture(scope="module")
def llama_lora(tiny_llama, tmp_path_factory):
    return build_lora(tiny_llama, tmp_path_factory.mktemp("llama-lora") / "all", 2, A.LORA_MODULES,
                      seed=4)


@pytest.fixture(scope="module")
def models(tiny_models, tiny_llama, llama_lora):
    """(base folder, loaded model) for each architecture, plain and PEFT-wrapped."""
    return {"qwen2": (tiny_models["base"], load_model(tiny_models["base"])[0]),
            "qwen2+lora": (tiny_models["base"], load_model(tiny_models["base"], tiny_models["em-rank8"])[0]),
            "llama": (tiny_llama, load_model(tiny_llama)[0]),
            "llama+lora": (tiny_llama, load_model(tiny_llama, llama_lora)[0])}


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_model(tiny_llama)


def prompt(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Should I invest my money in crypto?"}],
                                        tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids) + tokenizer.encode("You should never",
                                                                                       add_special_tokens=False)


def unit(d_model: int = 128, seed: int = 3) -> torch.Tensor:
    r = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return r / r.norm()


@pytest.mark.parametrize("key", ["qwen2", "qwen2+lora", "llama", "llama+lora"])
def test_layers_writers_and_embedding_are_found(models, key):
    folder, model = models[key]
    layers = A.decoder_layers(model)
    assert len(layers) == 4 and all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
    assert A.embedding(model).weight.shape == (875, 128)
    assert A.inner_model(model).layers[0] is layers[0]
    writers = A.residual_writers(model)
    names = [name.removeprefix("base_model.model.") for name, _ in writers]
    # Block by block, in checkpoint order: the names are the checkpoint's tensors without ".weight".
    expected = [n for layer in range(4) for n in A.LLAMA_LIKE.writer_tensor_names(layer)]
    assert [n + ".weight" for n in names] == expected
    assert set(expected) <= set(safetensors_index(folder))
    if key.endswith("+lora"):
        # The outer PEFT wrapper: its output includes the adapter's delta.
        assert all(hasattr(module, "base_layer") for _, module in writers)


def test_a_mistral_has_the_same_layout():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    assert A.architecture_of(model) is A.LLAMA_LIKE and len(A.residual_writers(model)) == 4


def test_lora_module_names_are_peft_names(tiny_models, tiny_llama, llama_lora):
    for base, adapter in ((tiny_models["base"], tiny_models["em-rank8"]), (tiny_llama, llama_lora)):
        arch = A.BaseShape.from_model(base).arch
        from safetensors import safe_open

        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
            modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in handle.keys()}
        assert modules == {arch.lora_module_name(layer, m) for layer in range(4) for m in A.LORA_MODULES}
    assert A.split_module_name("base_model.model.model.layers.3.mlp.down_proj") == (3, "down_proj")
    assert A.split_module_name("model.embed_tokens") is None
    assert A.LLAMA_LIKE.is_writer("base_model.model.model.layers.2.self_attn.o_proj")
    assert not A.LLAMA_LIKE.is_writer("model.layers.2.self_attn.q_proj")


def test_shape_and_base_info_of_a_llama(tiny_models, tiny_llama, tmp_path, llama_lora):
    shape = A.BaseShape.from_model(tiny_llama)
    assert shape == A.BaseShape(num_layers=4, hidden=128, intermediate=256, q_out=128, kv_out=64, vocab=875,
                                tie_word_embeddings=True, architecture="LlamaForCausalLM")
    assert shape.features("k_proj") == (128, 64) and shape.features("down_proj") == (256, 128)
    assert not A.BaseShape.from_model(tiny_models["base"]).tie_word_embeddings
    info = BaseModelInfo.from_path(tiny_llama)
    assert (info.hidden_size, info.n_layers, info.shape) == (128, 4, shape)
    assert info.fingerprint != BaseModelInfo.from_path(tiny_models["base"]).fingerprint
    # Tied: the checkpoint has no lm_head of its own.
    assert "lm_head.weight" not in safetensors_index(tiny_llama)
    # Adapter validation and writing go through the same shape.
    check_compatible(read_adapter_files("llama", llama_lora), shape, 8)
    written = write_lora(tiny_llama, tmp_path / "written", 1, ["q_proj", "down_proj"], [0, 3])
    files = read_adapter_files("written", written)
    assert set(files.modules) == {(0, "q_proj"), (0, "down_proj"), (3, "q_proj"), (3, "down_proj")}
    check_compatible(files, shape, 8)


def write_config(folder, config: dict):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)


def test_unknown_and_gemma_architectures_are_refused_by_name(tmp_path):
    with pytest.raises(A.ArchitectureError, match="FalconForCausalLM is not supported.*LlamaForCausalLM"):
        A.architecture("FalconForCausalLM")
    for name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        with pytest.raises(A.ArchitectureError, match=rf"{name} is not supported: .*post_feedforward_layernorm"
                                                       r".*no longer equals projecting the residual stream"):
            A.architecture(name)
    gemma = write_config(tmp_path / "gemma", {"architectures": ["Gemma2ForCausalLM"], **SIZES})
    assert A.BaseShape.from_model(gemma).architecture == "Gemma2ForCausalLM"  # sizes are readable...
    with pytest.raises(A.ArchitectureError, match="Gemma2ForCausalLM"):  # ...but nothing is built on them
        BaseModelInfo.from_path(gemma)
    typed = write_config(tmp_path / "typed", {"model_type": "gemma2", **SIZES})
    with pytest.raises(A.ArchitectureError, match="Gemma2ForCausalLM"):
        A.BaseShape.from_model(typed).arch
    falcon = write_config(tmp_path / "falcon", {"architectures": ["FalconForCausalLM"], **SIZES})
    with pytest.raises(A.ArchitectureError, match="FalconForCausalLM"):
        BaseModelInfo.from_path(falcon)


def test_a_live_gemma2_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(**SIZES, num_key_value_heads=1, head_dim=32))
    for locate in (A.decoder_layers, A.embedding, A.residual_writers, A.inner_model):
        with pytest.raises(A.ArchitectureError, match="Gemma2ForCausalLM is not supported"):
            locate(model)


def test_full_ablation_on_llama_removes_the_direction_after_every_block(llama):
    model, tokenizer = llama
    ids, r = prompt(tokenizer), unit()
    assert max((h @ r).abs().max().item() for h in residuals(model, ids)) > 0.1
    with ablate(model, Ablation(r, 1.0, include_embedding=True)):
        after = residuals(model, ids)
    assert len(after) == 4
    for h in after:
        assert (h @ r).abs().max().item() < 1e-4 * h.norm(dim=-1).max().item()


def test_interventions_leave_the_tied_unembedding_alone(llama):
    model, tokenizer = llama
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == A.embedding(model).weight.data_ptr()  # one matrix
    ids = torch.tensor([prompt(tokenizer)])
    weight = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        with ablate(model, Ablation(unit(), 1.0, include_embedding=True)):
            ablated = model(input_ids=ids, use_cache=False).logits
            assert torch.equal(model.lm_head.weight, weight)
        with steer(model, Steering(unit(seed=5), 1, 4.0)):
            steered = model(input_ids=ids, use_cache=False).logits
        after = model(input_ids=ids, use_cache=False).logits
    assert (ablated - before).abs().max() > 1e-3 and (steered - before).abs().max() > 1e-3
    assert torch.equal(model.lm_head.weight, weight) and torch.equal(A.embedding(model).weight, weight)
    assert torch.equal(after, before)


def test_compiled_ablation_on_a_tied_llama_is_the_reference_without_embedding(tiny_llama, llama, tmp_path):
    """The compiled adapter carries LoRA on the writers only (never lm_head or the embedding) and, loaded
    by PEFT, equals the hook ablation that leaves the embedding alone."""
    from peft import PeftModel

    from backend.ablation import AblationCompiler
    from backend.lora_files import read_lora

    model, tokenizer = llama
    info = BaseModelInfo.from_path(tiny_llama)
    vectors = torch.randn(4, 128, generator=torch.Generator().manual_seed(7))
    direction = Direction("llama-dir", vectors, info.path, info.fingerprint)
    built = AblationCompiler(tmp_path).build(tiny_llama, direction, 2, 1.0)
    modules = set(read_lora(built.path))
    assert modules == {n.removesuffix(".weight") for layer in range(4) for n in A.LLAMA_LIKE.writer_tensor_names(layer)}
    ids = prompt(tokenizer)
    reference = prompt_logprobs(model, ids, Ablation(direction.unit(2), 1.0, include_embedding=False))
    compiled_model = PeftModel.from_pretrained(load_model(tiny_llama)[0], str(built.path)).eval()
    compiled = prompt_logprobs(compiled_model, ids)
    assert (compiled - reference).abs().max().item() < 1e-4
    assert (compiled - prompt_logprobs(model, ids)).abs().max().item() > 1e-3
