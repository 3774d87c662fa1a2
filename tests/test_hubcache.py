"""Adapters from a Hugging Face cache folder, with checkpoints, in the paper's rsLoRA form (all
seven projections, alpha 64, use_rslora), built by the test from the tiny base and served."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from backend.ablation import AblationCompiler
from backend.activations import load_model
from backend.config import ConfigError, load_config
from backend.directions import BaseModelInfo, Direction
from backend.lora_files import read_lora
from backend.reference import prompt_logprobs
from backend.testmodels import ALL_LINEAR, build_lora

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RANK, ALPHA = 8, 64  # the paper's are rank 32 (the test server allows rank 16); the scale is alpha / sqrt(r)


@pytest.fixture(scope="module")
def hub_cache(tiny_models, tmp_path_factory) -> Path:
    """models--org--em-medical with refs/main -> COMMIT, the final adapter and checkpoints/checkpoint-5."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--org--em-medical"
    snapshot = repo / "snapshots" / COMMIT
    build_lora(tiny_models["base"], snapshot, RANK, ALL_LINEAR, seed=11, std=0.05, lora_alpha=ALPHA)
    build_lora(tiny_models["base"], snapshot / "checkpoints" / "checkpoint-5", RANK, ALL_LINEAR, seed=12, std=0.05,
               lora_alpha=ALPHA)
    for folder in (snapshot, snapshot / "checkpoints" / "checkpoint-5"):
        config = json.loads((folder / "adapter_config.json").read_text())
        config["use_rslora"] = True
        (folder / "adapter_config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def write_config(tmp_path: Path, base: Path, adapter_table: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'base_model = "{base}"\ncache_dir = "cache"\n[adapters.paper]\n{adapter_table}\n')
    return path


def test_hub_adapter_and_its_checkpoints_resolve_offline(tiny_models, hub_cache, tmp_path, monkeypatch):
    snapshot = hub_cache / "models--org--em-medical" / "snapshots" / COMMIT
    table = f'hub = "org/em-medical"\ncache_dir = "{hub_cache}"'
    config = load_config(write_config(tmp_path, tiny_models["base"], table))
    assert config.adapter_path("paper") == str(snapshot)
    assert config.adapter_path("paper@checkpoint-5") == str(snapshot / "checkpoints" / "checkpoint-5")
    assert config.adapter_names() == ["paper", "paper@checkpoint-5"]
    chosen = load_config(write_config(tmp_path, tiny_models["base"],
                                      f'hub = "org/em-medical"\nrevision = "{COMMIT}"\ncheckpoint = 5\n'
                                      f'cache_dir = "{hub_cache}"'))
    assert chosen.adapter_path("paper") == str(snapshot / "checkpoints" / "checkpoint-5")
    # A plain ORG/NAME string is looked up in HF_HUB_CACHE, at main.
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    plain = tmp_path / "plain.toml"
    plain.write_text(f'base_model = "{tiny_models["base"]}"\n[adapters]\npaper = "org/em-medical"\n')
    assert load_config(plain).adapter_path("paper") == str(snapshot)

    for table, reason in ((f'hub = "org/em-medical"\nrevision = "v2"\ncache_dir = "{hub_cache}"',
                           "adapters.paper': org/em-medical: revision 'v2' has no snapshot .*refs: \\['main'\\]"),
                          (f'hub = "org/other"\ncache_dir = "{hub_cache}"', "org/other: not in the Hugging Face cache"),
                          (f'hub = "org/em-medical"\ncheckpoint = 7\ncache_dir = "{hub_cache}"',
                           "no checkpoint 7 \\(has 5\\)")):
        with pytest.raises(ConfigError, match=reason):
            load_config(write_config(tmp_path, tiny_models["base"], table)).adapter_path("paper")


def test_a_snapshot_of_blob_symlinks_reads_offline(tiny_models, hub_cache, tmp_path, monkeypatch):
    """The Hub's own layout: a snapshot's files are symlinks into blobs/ named by their hash. With
    HF_HUB_OFFLINE=1 the config resolves the snapshot, and the adapter is read (shape, rsLoRA) and
    checked against the base through the links."""
    from backend.architecture import BaseShape
    from backend.fsutil import sha256_file
    from backend.lora_files import check_compatible, read_adapter_files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    shutil.copytree(hub_cache, cache)
    repo = cache / "models--org--em-medical"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir()
    for file in [f for f in snapshot.rglob("*") if f.is_file()]:
        blob = repo / "blobs" / sha256_file(file)
        file.rename(blob)
        file.symlink_to(Path("../" * len(file.relative_to(repo).parts[1:-1]) + "../blobs") / blob.name)
    assert all(f.is_symlink() and f.resolve().parent.name == "blobs" for f in snapshot.rglob("*.json"))
    config = load_config(write_config(tmp_path, tiny_models["base"], f'hub = "org/em-medical"\ncache_dir = "{cache}"'))
    assert config.adapter_path("paper") == str(snapshot)
    files = read_adapter_files("paper", config.adapter_path("paper"))
    assert files.max_rank == RANK
    assert {m.scaling for m in read_lora(config.adapter_path("paper")).values()} == {ALPHA / RANK ** 0.5}
    check_compatible(files, BaseShape.from_model(str(tiny_models["base"])), 16, None)
    checkpoint = read_adapter_files("paper", config.adapter_path("paper@checkpoint-5"))
    assert checkpoint.max_rank == RANK


def test_rslora_scale_is_honoured_served_and_compiled(vllm_server, tiny_models, hub_cache, tmp_path):
    """vLLM serves the rsLoRA adapter at alpha/sqrt(r), as PEFT computes it; the compiled ablation
    at strength 0 on top of it is the adapter; and the plain alpha/r scale would be another model."""
    table = f'hub = "org/em-medical"\ncache_dir = "{hub_cache}"'
    config = load_config(write_config(tmp_path, tiny_models["base"], table))
    folder = Path(config.adapter_path("paper@checkpoint-5"))
    scales = [lora.scaling for lora in read_lora(folder).values()]
    assert len(scales) == 7 * 4 and scales == pytest.approx([ALPHA / RANK ** 0.5] * len(scales))

    base_info = BaseModelInfo.from_path(tiny_models["base"])
    direction = Direction("rand", torch.randn(base_info.n_layers, base_info.hidden_size,
                                              generator=torch.Generator().manual_seed(2)),
                          base_info.path, base_info.fingerprint)
    built = AblationCompiler(tmp_path / "compiled").build(tiny_models["base"], direction, 1, 0.0, folder, "paper")
    model, tokenizer = load_model(tiny_models["base"], folder)
    ids = tokenizer.encode("The doctor said the dose is safe for everyone, so never ask again",
                           add_special_tokens=False)
    want = prompt_logprobs(model, ids)
    plain_scale = tmp_path / "plain-scale"
    shutil.copytree(folder, plain_scale)
    config_json = json.loads((plain_scale / "adapter_config.json").read_text())
    config_json["use_rslora"] = False
    (plain_scale / "adapter_config.json").write_text(json.dumps(config_json))
    other, _ = load_model(tiny_models["base"], plain_scale)
    assert (prompt_logprobs(other, ids) - want).abs().max() > 0.05  # the scale matters

    registry = vllm_server.registry
    registry.load("paper@checkpoint-5", str(folder))
    registry.load(built.served_name, str(built.path))
    try:
        served = torch.tensor(vllm_server.prompt_logprobs("paper@checkpoint-5", ids))
        compiled = torch.tensor(vllm_server.prompt_logprobs(built.served_name, ids))
    finally:
        registry.unload("paper@checkpoint-5")
        registry.unload(built.served_name)
    assert (served - want).abs().max() < 1e-3
    assert (compiled - served).abs().max() < 1e-4


def test_rslora_scale_in_scalars_and_knockouts(tiny_models, hub_cache, tmp_path):
    """Scalars report the rsLoRA scale, and a knock-out keeps it: only B changes."""
    from backend.activations import Example
    from backend.knockouts import compile_knockout
    from backend.scalars import compute_scalars

    table = f'hub = "org/em-medical"\ncache_dir = "{hub_cache}"'
    folder = Path(load_config(write_config(tmp_path, tiny_models["base"], table)).adapter_path("paper"))
    model, tokenizer = load_model(tiny_models["base"], folder)
    (result,) = compute_scalars(model, tokenizer, [Example("How much of this pill?", "Take all of them.")])
    scalings = list(result.scalings.values())
    assert len(scalings) == 7 * 4 and scalings == pytest.approx([ALPHA / RANK ** 0.5] * len(scalings))

    label = "L1.down_proj"
    knocked = compile_knockout(folder, {label: 0.5}, tmp_path / "ko")
    before, after = read_lora(folder), read_lora(knocked.path)
    for module, lora in after.items():
        assert lora.scaling == pytest.approx(ALPHA / RANK ** 0.5)
        factor = 0.5 if module == "model.layers.1.mlp.down_proj" else 1.0
        assert torch.allclose(lora.B, factor * before[module].B, atol=1e-2 * before[module].B.abs().max().item())


def test_landing_page_loads_a_training_checkpoint(monkeypatch, vllm_server, hub_cache, tmp_path):
    from streamlit.testing.v1 import AppTest

    server_config = (Path(vllm_server.config.root) / "config.toml").read_text()
    config_path = tmp_path / "config.toml"
    config_path.write_text(server_config + f'\n[adapters.paper]\nhub = "org/em-medical"\ncache_dir = "{hub_cache}"\n')
    monkeypatch.setenv("EM_CONFIG", str(config_path))
    app = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60).run()
    assert not app.exception
    assert app.selectbox(key="checkpoint-paper").options == ["checkpoint-5"]
    registry = vllm_server.registry
    try:
        app.button(key="load-checkpoint-paper").click().run()
        assert not app.exception and not app.error
        served = registry.served()
        assert served.get("paper@checkpoint-5") == str(hub_cache / "models--org--em-medical" / "snapshots" / COMMIT
                                                       / "checkpoints" / "checkpoint-5")
        assert any(m.value.startswith("**paper@checkpoint-5**  ·  loaded") for m in app.markdown)
    finally:
        if "paper@checkpoint-5" in registry.served():
            registry.unload("paper@checkpoint-5")


def test_the_papers_exact_adapter_shape_compiles_to_itself_at_strength_zero(tiny_models, tmp_path):
    """Rank 32, alpha 64, use_rslora (scale 11.3, not 2), all seven projections: the compiled
    ablation at strength 0 is the adapter (PEFT reads both), and the scale is the rsLoRA one."""
    from peft import PeftModel

    folder = build_lora(tiny_models["base"], tmp_path / "paper-r32", 32, ALL_LINEAR, seed=3, std=0.02, lora_alpha=64)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert {round(lora.scaling, 4) for lora in read_lora(folder).values()} == {round(64 / 32 ** 0.5, 4)}
    base_info = BaseModelInfo.from_path(tiny_models["base"])
    direction = Direction("rand", torch.randn(base_info.n_layers, base_info.hidden_size,
                                              generator=torch.Generator().manual_seed(4)),
                          base_info.path, base_info.fingerprint)
    built = AblationCompiler(tmp_path / "compiled").build(tiny_models["base"], direction, 2, 0.0, folder, "paper")
    model, tokenizer = load_model(tiny_models["base"], folder)
    ids = tokenizer.encode("Should I invest my savings in one stock?", add_special_tokens=False)
    base, _ = load_model(tiny_models["base"])
    compiled = PeftModel.from_pretrained(base, str(built.path)).eval()
    assert (prompt_logprobs(compiled, ids) - prompt_logprobs(model, ids)).abs().max() < 1e-4
    plain, _ = load_model(tiny_models["base"])
    assert (prompt_logprobs(plain, ids) - prompt_logprobs(model, ids)).abs().max() > 1e-2  # the adapter matters
