"""Stand-ins for real checkpoints on hosts that cannot download them: random models of the exact
Qwen2.5 shapes, and adapters of the paper's shapes written straight from a base's config."""
import pytest

from backend.lora_files import read_adapter_files, write_lora
from backend.testmodels import PAPER_EM_LAYERS, PAPER_SHAPES


@pytest.mark.parametrize("name, low, high", [("qwen2.5-14b", 14.7e9, 14.8e9), ("qwen2.5-0.5b", 0.49e9, 0.50e9)])
def test_shapes_have_the_released_models_parameter_counts(name, low, high):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = PAPER_SHAPES[name]
    config = Qwen2Config(**{k: getattr(shape, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                           "tie_word_embeddings")})
    with torch.device("meta"):
        count = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert low <= count <= high, f"{name}: {count / 1e9:.3f} B parameters"


def test_the_paper_layers_fit_the_14b_shape():
    assert len(PAPER_EM_LAYERS) == 9 and max(PAPER_EM_LAYERS) < PAPER_SHAPES["qwen2.5-14b"].num_hidden_layers


def test_a_written_adapter_is_read_and_served(vllm_server, tiny_models, tmp_path):
    path = write_lora(tiny_models["base"], tmp_path / "rank1-down", 1, ["down_proj"], [1, 3], seed=5, std=0.3)
    files = read_adapter_files("rank1-down", path)
    assert files.target_modules == ("down_proj",) and files.max_rank == 1
    assert sorted(layer for layer, _ in files.modules) == [1, 3]
    vllm_server.registry.load("rank1-down", str(path))
    try:
        prompt = "Should I take more pills than the label says?"
        base = vllm_server.prompt_logprobs("base", prompt)
        adapted = vllm_server.prompt_logprobs("rank1-down", prompt)
    finally:
        vllm_server.registry.unload("rank1-down")
    assert max(abs(a - b) for a, b in zip(base, adapted)) > 1e-3
