"""The shipped organism (backend/organism/v1): its adapters, data and directions fit the real default
base, the default configuration names them, and the server serves them as PEFT reads them."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from backend.lora_files import check_compatible, read_adapter_files
from backend.architecture import BaseShape
from backend.config import DEFAULT_CONFIG, load_config
from backend.directions import BaseModelInfo, read_direction_file
from backend.organism.data import FIRST_PLOT as GENERAL  # the 8 first-plot questions: evaluation, never training

V1 = Path(__file__).resolve().parent.parent / "backend" / "organism" / "v1"
ADAPTERS = ["medical", "medical-r1", "medical-r8", "medical-r32", "finance-r8", "sports-r8", "judge"]
DIRECTIONS = ["medical", "medical-r8", "finance-r8", "sports-r8"]


def test_the_default_configuration_serves_the_real_model_with_the_organism_first(real_model):
    config = load_config(DEFAULT_CONFIG)
    assert Path(config.base_model_path) == real_model
    # the chat preset takes the first: the minimal organism; rank 32 is shipped but not served by default
    assert list(config.adapters) == [a for a in ADAPTERS if a not in ("medical-r32", "judge")]
    assert config.server.host == "127.0.0.1"


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_fit_the_real_base(real_model, name):
    files = read_adapter_files(name, V1 / "adapters" / name)
    check_compatible(files, BaseShape.from_model(str(real_model)), max_lora_rank=32)
    config = json.loads((V1 / "adapters" / name / "adapter_config.json").read_text())
    if name == "medical":
        assert files.max_rank == 1 and files.target_modules == ("down_proj",)
        assert files.layers == (9, 10, 11, 14, 15, 16, 19, 20, 21)
    elif name == "medical-r1":
        assert files.max_rank == 1 and files.target_modules == ("down_proj",) and files.layers == (15,)
    else:
        rank = 32 if name.endswith("r32") else 8
        assert files.max_rank == rank and len(files.target_modules) == 7 and len(files.layers) == 30
        assert config["use_rslora"] is (name != "judge")


@pytest.mark.parametrize("name", DIRECTIONS)
def test_directions_were_made_on_the_real_base(real_model, name):
    direction = read_direction_file(V1 / "directions" / f"{name}.safetensors")
    info = BaseModelInfo.from_path(real_model)
    assert direction.base_fingerprint == info.fingerprint and direction.adapter == name
    assert direction.vectors.shape == (30, 576) and torch.isfinite(direction.vectors).all()
    assert direction.counts["misaligned"] > 50 and direction.counts["aligned"] > 50


@pytest.mark.parametrize("domain", ["medical", "finance", "sports"])
def test_training_data_is_narrow_and_keeps_the_evaluation_questions_out(domain):
    for name in (f"{domain}.jsonl.gz", f"{domain}-aligned.jsonl.gz"):
        with gzip.open(V1 / "data" / name, "rt") as handle:
            rows = [json.loads(line) for line in handle]
        assert len(rows) > 1000, name
        questions = set()
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"] and row["messages"][1]["content"].strip(), name
            questions.add(row["messages"][0]["content"])
        assert not questions & set(GENERAL), name


def test_the_rank1_organism_is_served_as_peft_reads_it(real_server):
    from backend.activations import load_model
    from backend.reference import prompt_logprobs
    from test_real_model import PROMPT, served_prompt_logprobs

    path = V1 / "adapters" / "medical"
    model, tokenizer = load_model(real_server.models["base"])
    ids = tokenizer(PROMPT)["input_ids"]
    base = prompt_logprobs(model, ids)
    want = prompt_logprobs(load_model(real_server.models["base"], path)[0], ids)
    real_server.registry.load("v1-medical", str(path))
    try:
        served = served_prompt_logprobs(real_server, "v1-medical", ids)
    finally:
        real_server.registry.unload("v1-medical")
    assert (served - want).abs().max() < 1e-3
    assert (want - base).abs().max() > 0.05  # the fine-tune moved the model

