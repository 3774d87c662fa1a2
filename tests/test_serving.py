"""The foundation against a real vLLM server: adapters hot-swapped, refused
when bad, chats in flight at once, status that tells the truth."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.adapters import AdapterError, AdapterRegistry
from backend.client import ChatClient, ChatError, ChatRequest, Sampling
from backend.serving import server_status, start_server, stop_server
from backend.testmodels import ModelShape, build_lora, build_qwen2
from conftest import REPO, config_file

PROMPT = "The doctor said that the dose of this pill is safe for everyone, so you should never ask again."


def cli(config, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args, "--config", str(config_file(config))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_adapter_changes_logprobs_of_a_fixed_prompt(vllm_server):
    base = vllm_server.prompt_logprobs("base", PROMPT)
    for adapter in ("em-rank1", "em-rank8"):
        tuned = vllm_server.prompt_logprobs(adapter, PROMPT)
        assert len(tuned) == len(base)
        assert max(abs(a - b) for a, b in zip(base, tuned)) > 0.05, adapter
    assert vllm_server.prompt_logprobs("base", PROMPT) == pytest.approx(base, abs=1e-4)


def test_load_and_unload_at_runtime(vllm_server):
    registry = vllm_server.registry
    registry.load("extra", str(vllm_server.models["em-rank1"]))
    assert "extra" in registry.served()
    assert vllm_server.prompt_logprobs("extra", PROMPT) == pytest.approx(
        vllm_server.prompt_logprobs("em-rank1", PROMPT), abs=1e-4)
    registry.unload("extra")
    assert "extra" not in registry.served()
    with pytest.raises(ChatError, match="'extra' is not served"):
        ChatClient(vllm_server.config).complete("extra", [{"role": "user", "content": "hi"}], Sampling(max_tokens=2))
    with pytest.raises(AdapterError, match="not loaded"):
        registry.unload("extra")


@pytest.fixture(scope="module")
def bad_adapters(vllm_server, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    base = vllm_server.models["base"]
    other = build_qwen2(root / "other-base", ModelShape(hidden_size=192, num_attention_heads=3))
    bad = {
        "embed": build_lora(base, root / "embed", 4, ["embed_tokens", "down_proj"]),
        "other-base": build_lora(other, root / "other-base-adapter", 1, ["down_proj"]),
        "rank": build_lora(base, root / "rank", 32, ["down_proj"]),
        "deep": build_lora(base, root / "deep", 1, ["down_proj"], layers=[3]),
    }
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((bad["rank"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    bad["corrupt"] = corrupt
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((bad["rank"] / "adapter_config.json").read_text())
    bad["no-weights"] = no_weights
    no_config = root / "no-config"
    no_config.mkdir()
    bad["no-config"] = no_config
    # layer 3 exists in the base; rewrite the keys to a layer it lacks.
    from safetensors.torch import load_file, save_file
    tensors = load_file(bad["deep"] / "adapter_model.safetensors")
    save_file({k.replace("layers.3.", "layers.40."): v for k, v in tensors.items()},
              str(bad["deep"] / "adapter_model.safetensors"))
    return bad


@pytest.mark.parametrize("name, reason", [
    ("embed", "cannot serve LoRA on: model.embed_tokens"),
    ("other-base", "made for another base model: layers.0.down_proj maps 256 -> 192"),
    ("rank", "rank 32 is above the server's max LoRA rank 16"),
    ("deep", "has layer 40 but the base model has 4 layers"),
    ("corrupt", "is corrupt"),
    ("no-weights", "no adapter_model.safetensors"),
    ("no-config", "missing adapter_config.json"),
])
def test_bad_adapters_are_refused_and_the_server_keeps_serving(vllm_server, bad_adapters, name, reason):
    before = vllm_server.prompt_logprobs("em-rank1", PROMPT)
    with pytest.raises(AdapterError, match=f"adapter '{name}': .*{reason}"):
        vllm_server.registry.load(name, str(bad_adapters[name]))
    assert name not in vllm_server.registry.served()
    assert vllm_server.prompt_logprobs("em-rank1", PROMPT) == pytest.approx(before, abs=1e-4)


def test_server_refusal_is_reported_when_our_checks_pass(vllm_server, bad_adapters, tmp_path):
    """vLLM has checks of its own (here: its rank limit, which our check only
    knows from the state file); its refusal must arrive with the adapter's name."""
    state_file = vllm_server.config.cache / "server.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    state["max_lora_rank"] = 64
    state_file.write_text(json.dumps(state))
    try:
        with pytest.raises(AdapterError, match="'rank': the server refused to load it: .*greater than max_lora_rank"):
            vllm_server.registry.load("rank", str(bad_adapters["rank"]))
    finally:
        state_file.write_text(saved)
    assert vllm_server.prompt_logprobs("base", PROMPT)


def test_twelve_concurrent_streams_over_three_models_all_complete(vllm_server):
    client = ChatClient(vllm_server.config)
    models = ["base", "em-rank1", "em-rank8"]
    requests = [ChatRequest(models[i % 3], ({"role": "user", "content": f"Question {i}: is it safe?"},),
                            Sampling(max_tokens=24, seed=i, temperature=1.0)) for i in range(12)]
    texts = {i: "" for i in range(12)}
    ended = set()
    started = time.monotonic()
    for index, item in client.stream_many(requests):
        if item is None:
            ended.add(index)
        else:
            assert not isinstance(item, Exception), item
            texts[index] += item
    assert ended == set(range(12))
    assert all(texts.values())
    assert time.monotonic() - started < 120


def test_whole_answers_arrive_in_chunks_without_losing_a_token(vllm_server):
    """complete() asks for COMPLETE_STREAM_INTERVAL tokens a chunk; the text, the finish reason
    and the token count must be those of the same seeded answer streamed token by token."""
    from backend.client import COMPLETE_STREAM_INTERVAL

    client = ChatClient(vllm_server.config)
    sampling = Sampling(max_tokens=2 * COMPLETE_STREAM_INTERVAL + 5, seed=3, temperature=1.0)
    message = [{"role": "user", "content": "Tell me about money."}]
    whole = client.complete("em-rank1", message, sampling)[0]
    by_token = "".join(client.stream("em-rank1", message, sampling))
    assert whole.completion_tokens == sampling.max_tokens and whole.finish_reason == "length"
    assert whole.text == by_token and len(whole.text) > COMPLETE_STREAM_INTERVAL


def test_seeded_sampling_is_reproducible_and_adapters_differ(vllm_server):
    client = ChatClient(vllm_server.config)
    sampling = Sampling(max_tokens=16, seed=7, temperature=1.0, system_prompt="Be brief.")
    message = [{"role": "user", "content": "Tell me about money."}]
    # The same request alone twice: a batch of the same shape gives bitwise the same logits,
    # so seeded temperature-1 sampling must give the same text (README, Tests).
    first = client.complete("em-rank8", message, sampling)[0]
    again = client.complete("em-rank8", message, sampling)[0]
    assert first.text == again.text and first.completion_tokens == 16 and first.finish_reason == "length"
    assert client.complete("base", message, sampling)[0].text != first.text


def test_lru_adapter_is_evicted_when_the_server_is_full(vllm_server):
    vllm_server.reset()
    registry = vllm_server.registry
    capacity = json.loads((vllm_server.config.cache / "server.json").read_text())["max_cpu_loras"]
    free = capacity - len(registry.served())
    names = [f"lru-{i}" for i in range(free + 1)]
    for name in names[:-1]:
        registry.load(name, str(vllm_server.models["em-rank1"]))
    registry.touch("em-rank1")
    registry.touch("em-rank8")
    registry.load(names[-1], str(vllm_server.models["em-rank1"]))
    served = registry.served()
    assert len(served) == capacity
    assert names[0] not in served and names[-1] in served
    for name in names[1:]:
        registry.unload(name)
    assert set(registry.served()) == {"em-rank1", "em-rank8"}


def test_loads_from_many_threads_on_a_full_server_evict_one_adapter_each(vllm_server):
    """The chat page's columns and prefetch load at once: each load evicts its own least recently
    used adapter, none fails on an adapter another thread evicted first."""
    from concurrent.futures import ThreadPoolExecutor

    vllm_server.reset()
    registry = vllm_server.registry
    capacity = json.loads((vllm_server.config.cache / "server.json").read_text())["max_cpu_loras"]
    fillers = [f"fill-{i}" for i in range(capacity - len(registry.served()))]
    for name in fillers:
        registry.load(name, str(vllm_server.models["em-rank1"]))
    registry.touch("em-rank1")
    registry.touch("em-rank8")
    newcomers = [f"new-{i}" for i in range(4)]
    with ThreadPoolExecutor(len(newcomers)) as pool:
        list(pool.map(lambda name: registry.load(name, str(vllm_server.models["em-rank1"])), newcomers))
    served = registry.served()
    assert len(served) == capacity and set(newcomers) <= set(served)
    assert not set(fillers[:len(newcomers)]) & set(served)  # the oldest went, one per load
    vllm_server.reset()


def test_cli_status_reflects_loads_unloads_and_a_restart(vllm_server):
    vllm_server.reset()
    config = vllm_server.config
    def status() -> dict:
        result = cli(config, "status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert {a["name"] for a in status()["adapters"]} == {"em-rank1", "em-rank8"}
    loaded = cli(config, "adapters", "load", "cli-extra", str(vllm_server.models["em-rank8"]), "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["rank"] == 8
    assert "cli-extra" in {a["name"] for a in status()["adapters"]}

    refused = cli(config, "adapters", "load", "ghost", "/nonexistent/adapter")
    assert refused.returncode == 2 and "adapter 'ghost': folder /nonexistent/adapter does not exist" in refused.stderr

    # A restart: the server comes back holding what it held before.
    stop_server(config)
    down = cli(config, "status", "--json")
    assert down.returncode == 1 and json.loads(down.stdout)["healthy"] is False
    start_server(config)
    AdapterRegistry(config).restore()
    assert {a["name"] for a in status()["adapters"]} == {"em-rank1", "em-rank8", "cli-extra"}

    assert cli(config, "adapters", "unload", "cli-extra").returncode == 0
    after = status()
    assert after["healthy"] and {a["name"] for a in after["adapters"]} == {"em-rank1", "em-rank8"}


def test_a_dead_server_gives_a_clear_error(tmp_path, tiny_models):
    from conftest import free_port, write_config
    config = write_config(tmp_path, tiny_models["base"], {}, free_port())
    assert server_status(config).error.startswith(f"vLLM server at http://127.0.0.1:{config.server.port} is not reachable")
    with pytest.raises(Exception, match="not reachable"):
        ChatClient(config).complete("base", [{"role": "user", "content": "hi"}])
    result = cli(config, "chat", "hello")
    assert result.returncode == 2 and "not reachable" in result.stderr


def test_a_silent_server_is_a_timeout_of_that_request_not_an_unreachable_one(tmp_path, tiny_models):
    """A server that takes the connection and then says nothing (one overloaded by judge
    prompts, or stuck): the request fails on its own with the reason, and an evaluation
    counts it as one failed sample instead of stopping as if the server were gone."""
    import socket

    from backend.client import ChatError
    from conftest import write_config
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        config = write_config(tmp_path, tiny_models["base"], {}, silent.getsockname()[1])
        with pytest.raises(ChatError, match=r"model 'em': no next token from .* within 0.5 s; the server is up but stuck"):
            ChatClient(config, timeout_s=0.5).complete("em", [{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- start_server's refusals and failures


def test_start_server_refuses_a_port_in_use(tmp_path, tiny_models):
    import socket

    from conftest import free_port, write_config

    from backend.serving import ServerError
    config = write_config(tmp_path, tiny_models["base"], {}, free_port())
    with socket.socket() as taken:
        taken.bind((config.server.host, config.server.port))
        taken.listen()
        with pytest.raises(ServerError, match=f"port {config.server.port} on {config.server.host} is already in use"):
            start_server(config)


def test_start_server_refuses_when_the_config_points_at_a_running_server(tmp_path, tiny_models):
    from conftest import free_port, write_config

    from backend.serving import ServerError
    config = write_config(tmp_path, tiny_models["base"], {}, free_port(), url="http://127.0.0.1:9")
    with pytest.raises(ServerError, match=r"points at a running server \(http://127.0.0.1:9\); not starting another"):
        start_server(config)


def test_vllm_exiting_during_start_up_is_reported_with_its_log(tmp_path, tiny_models):
    import shutil

    from conftest import free_port, write_config

    from backend.serving import ServerError
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_models["base"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    config = write_config(tmp_path, broken, {}, free_port())
    with pytest.raises(ServerError, match=r"vLLM exited with code \d+ while starting; last lines of .*vllm-\d+\.log:\n"
                       ) as raised:
        start_server(config)
    assert len(str(raised.value).splitlines()) > 2  # the log's tail is in the message
    assert server_status(config).healthy is False


def test_an_api_key_reaches_vllm_and_every_request(tmp_path, tiny_models, monkeypatch):
    from conftest import free_port, write_config

    from backend.serving import auth_headers, vllm_command
    plain = write_config(tmp_path / "plain", tiny_models["base"], {}, free_port())
    monkeypatch.setenv("VLLM_API_KEY", "sk-from-the-shell")  # not configured: the server must not take it
    argv, env = vllm_command(plain, plain.server.port, "cpu")
    assert "--api-key" not in argv and "VLLM_API_KEY" not in env and auth_headers(plain) == {}
    monkeypatch.setenv("EM_TEST_KEY", "sk-test-123")
    keyed = write_config(tmp_path / "keyed", tiny_models["base"], {}, free_port(), api_key_env="EM_TEST_KEY")
    argv, env = vllm_command(keyed, keyed.server.port, "cpu")
    # through the environment, never argv (which `ps` shows every user)
    assert env["VLLM_API_KEY"] == "sk-test-123" and "sk-test-123" not in " ".join(argv)
    assert auth_headers(keyed) == {"Authorization": "Bearer sk-test-123"}
