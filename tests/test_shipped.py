"""Shipped data (backend/shipped.py): a Parquet bundle exported from a store, imported whole or
not at all, marked as shipped on the pages, removable without touching the user's own runs.

The source store is the synthetic one (bench/make_synthetic_store.py: 3 adapters, 3 directions,
ablation sweeps), because the organism's judged acceptance runs do not exist yet; the code
path is the one those runs will take."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from backend import browse, shipped
from backend.store import RunRecord, SampleRow, Store

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from make_synthetic_store import make_store  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Store, Path]:
    folder = tmp_path_factory.mktemp("shipped")
    source = make_store(folder / "source.duckdb", 2000, runs=2)
    shipped.export_bundle(source, folder / "bundle", ["run-0"], description="synthetic test bundle")
    return source, folder / "bundle"


def counts(store: Store, run: str) -> dict[str, int]:
    out = {}
    for table in shipped.RUN_TABLES + ("sample_score_rows",):
        column = "id" if table == "runs" else "run_id"
        out[table] = store.sql(f"SELECT count(*) FROM {table} WHERE {column} = ?", [run]).rows[0][0]
    return out


def user_run(store: Store, run_id: str = "mine") -> None:
    store.create_run(RunRecord(id=run_id, status="finished"))
    store.insert_samples([SampleRow(run_id, "base", "q", 0, 0, "my question", "my answer")])


def test_export_then_import_gives_the_same_rows_and_numbers(bundle, tmp_path):
    source, folder = bundle
    manifest = shipped.read_manifest(folder)
    assert manifest["runs"] == ["run-0"] and sorted(manifest["direction_files"]) == [
        "dir-em-finance", "dir-em-medical", "dir-em-sports"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 200_000, size  # compact: 1040 samples + 2080 judgements + 3 directions

    store = Store(tmp_path / "em.duckdb")
    result = shipped.import_bundle(store, folder, tmp_path / "cache")
    assert result.skipped is None and result.rows["samples"] == 1040
    assert counts(store, "run-0") == counts(source, "run-0")
    assert store.sql("SELECT status FROM runs").rows == [("shipped",)]
    # The charts' numbers are the source's: EM per condition and along the strength sweep.
    filters = browse.Filters(runs=("run-0",))
    ours, theirs = browse.browse(store, filters), browse.browse(source, filters)
    assert ours.by_condition.equals(theirs.by_condition) and len(ours.by_condition) == 40
    assert ours.by_strength.equals(theirs.by_strength) and not ours.by_strength.empty
    # Directions: files in this cache, readable, registered as shipped, 3x3 cosines.
    infos = browse.directions(store, tmp_path / "cache")
    assert {i.name for i in infos} == set(result.directions) and not any(i.problem for i in infos)
    assert all(Path(i.path).parent == tmp_path / "cache" / "directions" for i in infos)
    cosines, skipped = browse.cosine_matrix(infos, 2)
    assert not skipped and len(cosines) == 9
    assert not browse.transfer_matrix(store, runs=("run-0",)).empty
    status = shipped.shipped_status(store)
    assert status.describe().startswith("shipped data (bundle 'bundle'): 1 run, 1,040 samples")
    assert status.description == "synthetic test bundle"  # the pages show the bundle's own caveats


def test_import_is_idempotent_and_refuses_a_clash_whole(bundle, tmp_path):
    _, folder = bundle
    store = Store(tmp_path / "em.duckdb")
    shipped.import_bundle(store, folder, tmp_path / "cache")
    again = shipped.import_bundle(store, folder, tmp_path / "cache")
    assert again.skipped == "bundle 'bundle' is already imported"
    assert counts(store, "run-0")["samples"] == 1040

    other = Store(tmp_path / "other.duckdb")
    user_run(other, "run-0")  # the user's own run of the same id
    with pytest.raises(shipped.ShippedError, match=r"already has run run-0 \(finished\)"):
        shipped.import_bundle(other, folder, tmp_path / "other-cache")
    assert counts(other, "run-0")["samples"] == 1 and not (tmp_path / "other-cache" / "directions").exists()


def test_a_changed_file_is_refused_before_anything_is_written(bundle, tmp_path):
    _, folder = bundle
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    with open(broken / "judgements.parquet", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\0\0\0\0")
    store = Store(tmp_path / "em.duckdb")
    user_run(store)
    with pytest.raises(shipped.ShippedError, match="judgements.parquet does not match its sha256"):
        shipped.import_bundle(store, broken, tmp_path / "cache")
    (broken / "samples.parquet").unlink()
    with pytest.raises(shipped.ShippedError, match="samples.parquet is listed in the manifest but missing"):
        shipped.import_bundle(store, broken, tmp_path / "cache")
    with pytest.raises(shipped.ShippedError, match="no manifest.json"):
        shipped.import_bundle(store, tmp_path, tmp_path / "cache")
    assert store.sql("SELECT id FROM runs").rows == [("mine",)]
    assert not (tmp_path / "cache" / "directions").exists()


def test_remove_keeps_the_users_runs_and_the_first_run_import_respects_it(bundle, tmp_path):
    _, folder = bundle
    store = Store(tmp_path / "em.duckdb")
    user_run(store)
    assert shipped.import_bundle(store, folder, tmp_path / "cache", first_run=True).skipped is None
    files = sorted((tmp_path / "cache" / "directions").glob("*.safetensors"))
    assert len(files) == 3
    gone = shipped.remove_shipped(store)
    assert gone.runs == ["run-0"] and gone.samples == 1040 and len(gone.directions) == 3
    assert counts(store, "run-0") == dict.fromkeys(shipped.RUN_TABLES + ("sample_score_rows",), 0)
    assert counts(store, "mine")["samples"] == 1
    assert not any(f.exists() for f in files) and store.directions() == []
    skipped = shipped.import_bundle(store, folder, tmp_path / "cache", first_run=True).skipped
    assert skipped.startswith("shipped data was removed on")
    assert counts(store, "run-0")["samples"] == 0
    # Asked for explicitly, it comes back.
    assert shipped.import_bundle(store, folder, tmp_path / "cache").rows["samples"] == 1040


def test_command_line_export_import_status_remove(bundle, tmp_path):
    source, _ = bundle
    # The checkout's real base model, with a cache of the test's own (direction files land there).
    config = tmp_path / "config.toml"
    config.write_text(f'base_model = "{REPO / "cache" / "models" / "smollm2-135m-instruct"}"\n'
                      f'cache_dir = "{tmp_path / "cache"}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "backend", "shipped", *args, "--config", str(config)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    out = tmp_path / "exported"
    done = cli("export", "--store", str(source.path), "--run", "run-1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "samples 960" in done.stdout and (out / "manifest.json").exists()
    refused = cli("export", "--store", str(source.path), "--run", "nope", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "no run 'nope'" in refused.stderr and not (tmp_path / "x").exists()

    store = tmp_path / "em.duckdb"
    done = cli("import", str(out), "--store", str(store), "--any-base")
    assert done.returncode == 0 and "imported bundle 'exported'" in done.stdout, done.stderr
    assert "1 run, 960 samples, 1,920 judgements, 3 directions" in cli("status", "--store", str(store)).stdout
    # The checkout's base model is not the synthetic one: its directions are refused with the reason.
    other = cli("import", str(out), "--store", str(tmp_path / "b.duckdb"))
    assert other.returncode == 2 and "extracted from another base model" in other.stderr
    assert "removed 1 shipped run (960 samples" in cli("remove", "--store", str(store)).stdout
    assert cli("import", str(out), "--store", str(store), "--first-run").stdout.startswith(
        "shipped data: shipped data was removed")
    no_bundle = cli("import", str(tmp_path / "none"), "--store", str(tmp_path / "c.duckdb"), "--first-run")
    assert no_bundle.returncode == 0 and "no shipped data in" in no_bundle.stdout


def test_pages_mark_shipped_data_and_home_removes_it(bundle, tmp_path, monkeypatch):
    _, folder = bundle
    (tmp_path / "config.toml").write_text(f'base_model = "Qwen/Qwen2.5-0.5B"\ncache_dir = "{tmp_path / "cache"}"\n'
                                          '[server]\nport = 1\n')
    monkeypatch.setenv("EM_CONFIG", str(tmp_path / "config.toml"))
    store = Store(tmp_path / "cache" / "em.duckdb")
    shipped.import_bundle(store, folder, tmp_path / "cache")

    app = AppTest.from_file(str(REPO / "pages" / "2_Evaluations.py"), default_timeout=60).run()
    assert not app.exception
    assert any("Includes shipped data: run run-0" in c.value for c in app.caption)
    assert len(app.get("vega_lite_chart")) == 5  # per condition, vs strength, scatter, per question, histogram
    table = app.dataframe[0]
    assert set(browse.KEY) <= set(table.value.columns)  # the frame keeps its keys (the detail looks rows up)
    order = list(table.proto.column_order)
    assert order[:5] == ["question", "answer", "aligned", "coherent", "condition"] and "run_id" not in order
    app.toggle(key="ev_show_keys").set_value(True).run()
    assert list(app.dataframe[0].proto.column_order)[-5:] == list(browse.KEY_COLUMNS)

    app = AppTest.from_file(str(REPO / "pages" / "3_Directions.py"), default_timeout=60).run()
    assert not app.exception
    assert any("shipped data, imported on the first run" in c.value for c in app.caption)
    specs = " ".join(c.proto.spec for c in app.get("vega_lite_chart"))
    assert "cosine" in specs.lower() and "transfer" in specs.lower()

    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not app.exception
    assert any("1 run, 1,040 samples" in i.value for i in app.info)
    app.button(key="remove-shipped").click().run()
    assert shipped.shipped_status(store).runs == [] and not app.exception
    assert any("Shipped data removed on" in c.value for c in app.caption)


def test_the_checkouts_bundle_is_the_organisms_acceptance_run_with_its_directions(tmp_path):
    """What a fresh clone imports on its first run: the judged acceptance run of the organism that
    config.toml serves, and the directions shipped beside the adapters, byte for byte."""
    store = Store(tmp_path / "em.duckdb")
    result = shipped.import_bundle(store, shipped.DEFAULT_BUNDLE, tmp_path / "cache", first_run=True)
    assert result.skipped is None
    conditions = {c for (c,) in store.sql("SELECT name FROM conditions WHERE run_id = 'accept-core'").rows}
    assert {"base", "adapter=medical", "adapter=medical,direction=medical,layer=15,strength=1"} <= conditions
    judged = store.sql("SELECT count(*) FROM judgements WHERE run_id = 'accept-core' AND score IS NOT NULL").rows[0][0]
    assert judged == 2 * store.sql("SELECT count(*) FROM samples WHERE run_id = 'accept-core'").rows[0][0] > 0
    # a direction without an adapter (the random control) keeps NULLs, not the string 'nan'
    assert store.sql("SELECT adapter, source_run FROM directions WHERE name = 'random-medical'").rows == [(None, None)]
    organism = REPO / "backend" / "organism" / "v1" / "directions"
    for file in organism.glob("*.safetensors"):
        assert (tmp_path / "cache" / "directions" / file.name).read_bytes() == file.read_bytes(), file.name
