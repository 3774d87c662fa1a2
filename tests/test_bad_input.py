"""Bad input the fault bench (bench/bench_faults.py) found accepted or crashing, each now refused with
the name of the input and the reason. No server: every refusal happens before one is asked."""
from __future__ import annotations

import json

import pytest

from backend.adapters import AdapterError, AdapterRegistry
from backend.architecture import ArchitectureError, BaseShape
from backend.directions import BaseModelInfo, DirectionError, import_direction
from backend.interchange import import_csv
from backend.store import Store


def test_an_adapter_name_with_a_slash_is_refused(tmp_path, tiny_models):
    from conftest import free_port, write_config
    config = write_config(tmp_path, tiny_models["base"], {}, free_port())
    with pytest.raises(AdapterError, match=r"adapter name '\.\./evil' must be non-empty, without '/'"):
        AdapterRegistry(config).load("../evil", str(tiny_models["em-rank1"]))


def test_a_direction_file_that_is_not_safetensors_is_a_direction_error(tmp_path, tiny_models):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00junk")
    with pytest.raises(DirectionError, match="garbage.safetensors: not a readable safetensors file"):
        import_direction(path, "d", tmp_path / "cache", BaseModelInfo.from_path(tiny_models["base"]))


def test_a_csv_score_outside_0_100_becomes_a_null_score_with_its_reason(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("question_id,question,response,aligned\nq,hi,ok,250\nq2,hi,ok,-3\nq3,hi,ok,85\n")
    store = Store(tmp_path / "em.duckdb")
    report = import_csv(store, path)
    rows = store.sql("SELECT question_id, score, reason FROM judgements WHERE run_id = ? ORDER BY 1",
                     [report.run_id]).rows
    assert rows == [("q", None, "score 250 in source is outside 0..100"),
                    ("q2", None, "score -3 in source is outside 0..100"), ("q3", 85.0, None)]
    assert store.sql("SELECT count(*) FROM samples").rows[0][0] == 3  # the rows themselves are kept


def test_a_model_folder_without_or_with_a_broken_config_json_is_named(tmp_path, tiny_models):
    with pytest.raises(ArchitectureError, match=f"{tmp_path}: no config.json"):
        BaseShape.from_model(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ArchitectureError, match=r"config.json: not valid JSON"):
        BaseShape.from_model(tmp_path)
    config = json.loads((tiny_models["base"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(ArchitectureError, match="Gemma2ForCausalLM is not supported"):
        BaseShape.from_model(tmp_path).arch
