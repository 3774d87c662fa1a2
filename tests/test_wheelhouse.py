"""scripts/wheelhouse.py without the network: host lists, platforms, the dependency walk (with a
fake index), refusal of replacements, checksums, split + join."""
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "wheelhouse", Path(__file__).resolve().parents[1] / "scripts" / "wheelhouse.py")
wh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wh)

HOST = {"torch": "2.11.0", "numpy": "2.5.2", "numba": "0.68.0", "typing-extensions": "4.16.0"}


def test_parse_host_list_normalises_and_skips_comments():
    got = wh.parse_host_list("# pip freeze\nTyping_Extensions==4.16.0\n\ntorch==2.11.0+cu130\n"
                             "-e git+https://x/y#egg=y\nmylib @ file:///tmp/mylib\n")
    assert got == {"typing-extensions": "4.16.0", "torch": "2.11.0+cu130", "mylib": ""}


def test_parse_host_list_rejects_a_bad_line():
    with pytest.raises(wh.WheelhouseError, match=r"line 2: not 'name==version'"):
        wh.parse_host_list("torch==2.11.0\ntorch>=2\n", "hosts.txt")


def test_missing_host_list(tmp_path):
    with pytest.raises(wh.WheelhouseError, match="host list not found"):
        wh.read_host_list(str(tmp_path / "nope.txt"))


def test_the_committed_host_list_parses():
    host, digest = wh.read_host_list(
        str(Path(__file__).resolve().parents[1] / "scripts/hosts/h100-py312-torch2.11.txt"))
    assert host["torch"] == "2.11.0" and len(host) > 150 and len(digest) == 64


def test_platforms_widen_to_older_glibc_and_unknown_is_refused():
    tags = wh.expand_platforms(["manylinux_2_31_x86_64"])
    assert tags[0] == "manylinux_2_31_x86_64"
    assert "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux_2_32_x86_64" not in tags
    with pytest.raises(wh.WheelhouseError, match="unknown platform 'win_amd64'"):
        wh.expand_platforms(["win_amd64"])


def _item(name, version, requires=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "download_info": {"url": f"https://x/{name.replace('-', '_')}-{version}-py3-none-any.whl",
                              "archive_info": {"hashes": {"sha256": "0" * 64}}}}


INDEX = {
    "vllm": [_item("vllm", "1.0", [
        "torch==2.10.0", "numba==0.65.0", "flashinfer-python==0.6.14", "tilelang==0.1.9",
        "tvm-ffi==0.1.9", "grammar>=0.2", "old-only; python_version < '3.12'",
        "armonly; platform_machine == 'aarch64'", "web[standard]", "typing_extensions>=4.10"])],
    "flashinfer-python": [_item("flashinfer-python", "0.6.13", ["nvidia-cutlass-dsl", "cuda-tile"]),
                          _item("flashinfer-python", "0.6.14", ["nvidia-cutlass-dsl"])],
    "grammar": [_item("grammar", "0.2.8", ["tvm-ffi>=0.1.11", "numpy"])],
    "tvm-ffi": [_item("tvm-ffi", "0.1.9"), _item("tvm-ffi", "0.1.11")],
    "web": [_item("web", "2.0", ["uv; extra == 'standard'", "docs; extra == 'docs'"])],
    "uv": [_item("uv", "1.0"), _item("uv", "2.0")],
}


def _fake_picker(calls):
    def pick(reqs):
        from pip._vendor.packaging.requirements import Requirement
        calls.append(list(reqs))
        out = {}
        for r in map(Requirement, reqs):
            ok = [i for i in INDEX[wh.norm(r.name)]
                  if r.specifier.contains(i["metadata"]["version"], prereleases=True)]
            assert ok, f"fake index has nothing for {r}"
            out[wh.norm(r.name)] = ok[-1]
        return out
    return pick


def test_walk_keeps_host_versions_applies_pins_exclusions_and_markers():
    calls = []
    res = wh.resolve(["vllm==1.0"], HOST, "3.12", ["manylinux_2_39_x86_64"],
                     excluded={"tilelang": "optional kernel", "nvidia-cutlass-dsl": "optional"},
                     pins={"tvm-ffi": "0.1.11", "flashinfer-python": "0.6.13"},
                     no_deps={"flashinfer-python": "kernels"}, pip=[], picker=_fake_picker(calls),
                     log=lambda m: None)
    got = {w["name"]: w["version"] for w in res["wheels"]}
    # torch / numba / numpy / typing-extensions stay the host's; old-only and armonly fail their
    # markers for cp312 x86_64; uv comes in through the web[standard] extra
    assert got == {"vllm": "1.0", "flashinfer-python": "0.6.13", "grammar": "0.2.8",
                   "tvm-ffi": "0.1.11", "web": "2.0", "uv": "2.0"}
    assert [e["name"] for e in res["excluded"]] == ["tilelang"]  # cutlass: below a no-deps package
    kept = {h["name"]: h for h in res["host_kept"]}
    assert kept["torch"]["satisfied"] is False and kept["numba"]["satisfied"] is False
    assert kept["typing-extensions"]["satisfied"] is True
    over = {o["name"]: o["ignored"] for o in res["pin_overrides"]}
    assert over["tvm-ffi"] == ["grammar 0.2.8: >=0.1.11", "vllm 1.0: ==0.1.9"]
    assert all("torch" not in r for c in calls for r in c)  # host packages never looked up


def _house(tmp_path, files, installed_like=None):
    d = tmp_path / "house"
    d.mkdir()
    wheels = []
    for name, data in files.items():
        (d / name).write_bytes(data)
        dist, version = wh.parse_wheel_filename(name)
        wheels.append({"name": dist, "version": version, "file": name, "size": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": 1, "requested": ["vllm==1.0"], "wheels": wheels,
                "host_list": {"sha256": "0" * 64}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, manifest


def test_a_wheel_that_would_replace_a_host_package_is_refused(tmp_path):
    d, man = _house(tmp_path, {"vllm-1.0-py3-none-any.whl": b"v",
                               "torch-2.12.0-cp312-cp312-manylinux_2_28_x86_64.whl": b"t"})
    with pytest.raises(wh.WheelhouseError,
                       match=r"would replace installed torch 2\.11\.0\+cu130 with 2\.12\.0 "
                             r"\(torch must never be replaced\)"):
        wh.check_wheels(d, man, {"torch": "2.11.0+cu130"})


def test_same_version_already_installed_is_skipped_not_refused(tmp_path):
    d, man = _house(tmp_path, {"vllm-1.0-py3-none-any.whl": b"v",
                               "numpy-2.5.2-cp312-cp312-manylinux_2_28_x86_64.whl": b"n"})
    todo, present = wh.check_wheels(d, man, {"numpy": "2.5.2", "torch": "2.11.0"})
    assert [w["name"] for w in todo] == ["vllm"] and [w["name"] for w in present] == ["numpy"]


def test_checksum_mismatch_is_refused(tmp_path):
    d, man = _house(tmp_path, {"vllm-1.0-py3-none-any.whl": b"original"})
    (d / "vllm-1.0-py3-none-any.whl").write_bytes(b"tampered")
    with pytest.raises(wh.WheelhouseError, match=r"vllm-1\.0-py3-none-any\.whl: checksum mismatch"):
        wh.check_wheels(d, man, {})


def test_split_join_round_trip_is_byte_identical(tmp_path):
    files = {"vllm-1.0-py3-none-any.whl": os.urandom(70_000),
             "small-0.1-py3-none-any.whl": os.urandom(300)}
    d, _ = _house(tmp_path, files)
    paths = wh.split(str(d), 16_384)
    assert len(paths) > 4 and all(p.stat().st_size <= 16_384 for p in paths)
    assert [p.name for p in paths][:2] == ["wheels.tar.part00", "wheels.tar.part01"]
    out = tmp_path / "joined"
    names = wh.join(str(d / "parts"), str(out))
    assert sorted(names) == sorted(["manifest.json", *files])
    for n in names:
        assert (out / n).read_bytes() == (d / n).read_bytes()
    man = json.loads((out / "manifest.json").read_text())
    assert wh.check_wheels(out, man, {})[0]  # the joined folder installs as is


def test_join_names_a_missing_piece(tmp_path):
    d, _ = _house(tmp_path, {"vllm-1.0-py3-none-any.whl": os.urandom(70_000)})
    paths = wh.split(str(d), 16_384)
    paths[1].unlink()
    with pytest.raises(wh.WheelhouseError, match=r"piece\(s\) missing: wheels\.tar\.part01"):
        wh.join(str(d / "parts"), str(tmp_path / "out"))


def test_partial_join_gives_the_small_wheels_of_the_first_pieces(tmp_path):
    files = {"vllm-1.0-py3-none-any.whl": os.urandom(70_000), "small-0.1-py3-none-any.whl": os.urandom(300)}
    d, _ = _house(tmp_path, files)
    paths = wh.split(str(d), 16_384)  # smallest first: the small wheel sits in piece 0
    for path in paths[1:]:
        path.rename(path.with_name("held-" + path.name))
    out = tmp_path / "partial"
    names = wh.join(str(d / "parts"), str(out), partial=True)
    assert names == ["manifest.json", "small-0.1-py3-none-any.whl"]
    assert (out / "small-0.1-py3-none-any.whl").read_bytes() == files["small-0.1-py3-none-any.whl"]
    assert not list(out.glob("*.part")) and not (out / "vllm-1.0-py3-none-any.whl").exists()
    for path in paths[1:]:
        path.with_name("held-" + path.name).rename(path)
    assert sorted(wh.join(str(d / "parts"), str(out), partial=True)) == sorted(["manifest.json", *files])
    assert (out / "vllm-1.0-py3-none-any.whl").read_bytes() == files["vllm-1.0-py3-none-any.whl"]


def test_strip_wheel_drops_the_members_and_their_record_lines(tmp_path):
    import zipfile
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg/__init__.py", "x = 1\n")
        z.writestr("pkg/_big_C.so", os.urandom(5000))
        z.writestr("pkg-1.0.dist-info/RECORD", "pkg/__init__.py,sha256=a,6\npkg/_big_C.so,sha256=b,5000\n"
                                               "pkg-1.0.dist-info/RECORD,,\n")
    dst = tmp_path / "out.whl"
    assert wh.strip_wheel(src, dst, ["pkg/_big_*.so"]) == ["pkg/_big_C.so"]
    with zipfile.ZipFile(dst) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        assert "_big_C" not in z.read("pkg-1.0.dist-info/RECORD").decode()
    with pytest.raises(wh.WheelhouseError, match="no member matches"):
        wh.strip_wheel(src, tmp_path / "again.whl", ["pkg/nothing*"])
    assert wh.parse_strips(["vllm:a/*.so", "Vllm:b"]) == {"vllm": ["a/*.so", "b"]}
