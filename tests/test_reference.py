"""The hook reference engine: ablation and steering are what they claim, and hooks never leak."""
from __future__ import annotations

import pytest
import torch

from backend.activations import load_model
from backend.reference import (Ablation, Steering, ablate, decoder_layers, generate, intervene,
                               prompt_logprobs, residual_writers, steer)


@pytest.fixture(scope="module")
def em_model(tiny_models):
    return load_model(tiny_models["base"], tiny_models["em-rank1"])


@pytest.fixture(scope="module")
def prompt_ids(em_model):
    _, tokenizer = em_model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Should I invest my money in crypto?"}],
                                        tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids) + tokenizer.encode("You should never", add_special_tokens=False)


def direction(d_model: int = 128, seed: int = 3) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed))


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def residuals(model, ids) -> list[torch.Tensor]:
    """Residual stream after every block, captured by hooks registered after any intervention."""
    captured = []
    handles = [layer.register_forward_hook(lambda m, a, out: captured.append(out.detach().clone()))
               for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def test_writers_are_the_peft_wrappers(em_model):
    model, _ = em_model
    names = [name for name, _ in residual_writers(model)]
    assert len(names) == 8 and not any(name.endswith("base_layer") for name in names)


def test_hooks_removed_even_on_error(em_model):
    model, _ = em_model
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, Ablation(direction(), 1.0), Steering(direction(), 1, 2.0)):
            assert hook_count(model) == before + 10  # embedding + 8 writers + 1 steering
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_strength_zero_is_the_plain_adapter(em_model, prompt_ids):
    model, _ = em_model
    plain = prompt_logprobs(model, prompt_ids)
    assert torch.equal(prompt_logprobs(model, prompt_ids, Ablation(direction(), 0.0)), plain)


def test_full_ablation_removes_the_direction_everywhere(em_model, prompt_ids):
    model, _ = em_model
    r = direction() / direction().norm()
    before = residuals(model, prompt_ids)
    assert max((h @ r).abs().max().item() for h in before) > 0.1  # there was something to remove
    with ablate(model, Ablation(r, 1.0)):
        after = residuals(model, prompt_ids)
    for h in after:
        assert (h @ r).abs().max().item() < 1e-4 * h.norm(dim=-1).max().item()


def test_ablation_is_idempotent(em_model, prompt_ids):
    model, _ = em_model
    once = prompt_logprobs(model, prompt_ids, Ablation(direction(), 1.0))
    twice = prompt_logprobs(model, prompt_ids, Ablation(direction(), 1.0), Ablation(direction(), 1.0))
    plain = prompt_logprobs(model, prompt_ids)
    assert (once - plain).abs().max() > 0.05  # the ablation does something
    assert torch.allclose(once, twice, atol=1e-5)
    # Strength 0.5 is not a projection: applying it twice must differ (the test can fail).
    half_twice = prompt_logprobs(model, prompt_ids, Ablation(direction(), 0.5), Ablation(direction(), 0.5))
    assert (half_twice - prompt_logprobs(model, prompt_ids, Ablation(direction(), 0.5))).abs().max() > 1e-3


def test_steering_adds_exactly_c_v_after_its_layer(em_model, prompt_ids):
    model, _ = em_model
    v = direction(seed=5)
    before = residuals(model, prompt_ids)
    with steer(model, Steering(v, layer=1, coefficient=2.5)):
        after = residuals(model, prompt_ids)
    assert torch.equal(after[0], before[0])
    assert torch.allclose(after[1] - before[1], (2.5 * v).expand_as(before[1]), atol=1e-5)
    assert not torch.allclose(after[2] - before[2], (2.5 * v).expand_as(before[2]), atol=1e-3)


def test_steering_only_generated_positions(em_model, prompt_ids):
    model, _ = em_model
    k = len(prompt_ids) - 3
    s = Steering(direction(seed=5), layer=1, coefficient=3.0, positions="generated")
    plain = prompt_logprobs(model, prompt_ids)
    steered = prompt_logprobs(model, prompt_ids, s, prompt_length=k)
    # entry t predicts token t+1 from positions <= t: untouched while t < k.
    assert torch.allclose(steered[:k], plain[:k], atol=1e-6)
    assert (steered[k:] - plain[k:]).abs().max() > 1e-2


def test_generated_steering_with_kv_cache_matches_recomputation(em_model):
    """Greedy generation with a KV cache must pick, at each step, the argmax of a
    full no-cache forward pass steered at the same positions."""
    model, tokenizer = em_model
    s = Steering(direction(seed=7), layer=2, coefficient=4.0, positions="generated")
    out = generate(model, tokenizer, ["hey I feel bored"], s, max_new_tokens=6)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hey I feel bored"}], tokenize=True,
                                           add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    full = prompt + out.token_ids[0]
    with intervene(model, s, prompt_length=len(prompt)), torch.no_grad():
        logits = model(input_ids=torch.tensor([full]), use_cache=False).logits[0]
    greedy = logits[len(prompt) - 1: len(full) - 1].argmax(-1).tolist()
    assert greedy == out.token_ids[0]
    unsteered = generate(model, tokenizer, ["hey I feel bored"], max_new_tokens=6)
    assert unsteered.token_ids != out.token_ids  # the steering changed something


def test_bad_interventions_refused(em_model):
    model, _ = em_model
    with pytest.raises(ValueError, match="zero"):
        Ablation(torch.zeros(128))
    with pytest.raises(ValueError, match="width 64"):
        with ablate(model, Ablation(torch.ones(64))):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steer(model, Steering(torch.ones(128), layer=4)):
            pass
    with pytest.raises(ValueError, match="prompt_length"):
        with steer(model, Steering(torch.ones(128), layer=0, positions="generated")):
            pass


def test_single_layer_ablation_by_hand(em_model, prompt_ids):
    """After block L the residual has no component along r; blocks before L are unchanged; the
    blocks after L see the projected stream, and that is all that changes (checked by running
    block L+1 by hand on the projected residual)."""
    model, _ = em_model
    r = direction() / direction().norm()
    layer = 1
    before = residuals(model, prompt_ids)
    assert (before[layer] @ r).abs().max() > 0.1  # there was something to remove
    with ablate(model, Ablation(r, 1.0, layer=layer)):
        after = residuals(model, prompt_ids)
    for index in range(layer):
        assert torch.equal(after[index], before[index])
    expected = before[layer] - (before[layer] @ r).unsqueeze(-1) * r
    assert torch.allclose(after[layer], expected, atol=1e-5)
    assert (after[layer] @ r).abs().max() < 1e-4 * after[layer].norm(dim=-1).max()
    # Later layers are not projected again: the component comes back through block L+1.
    assert (after[layer + 1] @ r).abs().max() > 1e-3
    assert not torch.allclose(after[layer + 1], before[layer + 1], atol=1e-3)


def test_single_layer_ablation_differs_from_all_layers(em_model, prompt_ids):
    model, _ = em_model
    single = prompt_logprobs(model, prompt_ids, Ablation(direction(), 1.0, layer=1))
    every = prompt_logprobs(model, prompt_ids, Ablation(direction(), 1.0))
    plain = prompt_logprobs(model, prompt_ids)
    assert (single - plain).abs().max() > 1e-3
    assert (single - every).abs().max() > 1e-3
    with pytest.raises(ValueError, match="layer 9 out of range"):
        prompt_logprobs(model, prompt_ids, Ablation(direction(), 1.0, layer=9))
