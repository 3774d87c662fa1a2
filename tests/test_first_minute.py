"""The first minute on a fresh clone: the chat preset of the default configuration and the 8
first-plot questions one click from an answer in every column."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from backend import chat
from backend.config import load_config
from backend.questions import load_questions

REPO = Path(__file__).resolve().parent.parent


def test_the_default_preset_is_base_organism_and_organism_ablated():
    config = load_config(REPO / "config.toml")
    # The organism's directions as run.sh imports them (named after their adapters); the
    # alphabetically first adapter (finance-r8) and the first direction were the old preset.
    directions = ["finance-r8", "medical", "medical-r8", "sports-r8"]
    specs = [c.spec for c in chat.preset(list(config.adapters), directions, 15)]
    assert specs == ["base", "adapter=medical", "adapter=medical,direction=medical,layer=15,strength=1"]
    assert chat.preset(list(config.adapters), [], 15)[1].spec == "adapter=medical"


def test_the_8_first_plot_questions_ask_every_column_in_one_click(monkeypatch, vllm_server):
    monkeypatch.setenv("EM_CONFIG", str(Path(vllm_server.config.root) / "config.toml"))
    app = AppTest.from_file(str(REPO / "pages" / "1_Chat.py"), default_timeout=180)
    app.query_params.update({"col": ["base", "adapter=em-rank1"], "max": "6", "seed": "1"})
    app.run()
    assert not app.exception
    general = [q.paraphrases[0] for q in load_questions("em_core") if q.domain == "general"]
    buttons = [app.button(key=f"first-{n}") for n in range(8)]
    assert [b.label for b in buttons] == general and len(general) == 8
    buttons[3].click().run()
    assert not app.exception
    histories = app.session_state["histories"]
    assert [h[-1].user for h in histories] == [general[3]] * 2
    assert all(h[-1].answers[0].text for h in histories)
    # Once the chat has a turn, the buttons make room for the columns (the sidebar keeps the list).
    assert not any(b.key and b.key.startswith("first-") for b in app.button)


def test_home_shows_evaluation_runs_in_progress(monkeypatch, tmp_path):
    from backend.store import RunRecord, SampleRow, Store
    (tmp_path / "config.toml").write_text(f'base_model = "Qwen/Qwen2.5-0.5B"\ncache_dir = "{tmp_path}"\n'
                                          '[server]\nport = 1\n')
    monkeypatch.setenv("EM_CONFIG", str(tmp_path / "config.toml"))
    store = Store(tmp_path / "em.duckdb")
    store.create_run(RunRecord(id="under-way", status="running"))
    store.insert_samples([SampleRow("under-way", "base", "q", 0, i, "q", "a") for i in range(3)])
    store.create_run(RunRecord(id="done", status="finished"))
    app = AppTest.from_file(str(REPO / "app.py"), default_timeout=60).run()
    assert not app.exception
    shown = " ".join([t.value for t in app.text] + [getattr(p, "text", "") or "" for p in app.get("progress")])
    assert "under-way" in shown and ("3 samples" in shown or "samples 3/" in shown), shown
    assert "done" not in shown.replace("under-way", "")
